#!/usr/bin/env bash
# One process against two on this CPU: distill the default model's answers to N training prompts (once with each
# process count: the data must come out identical), then train a drafter for STEPS steps at global batch BATCH,
# once in 1 process and once in 2 (torchrun, gloo), and compare the held-out agreement and the wall time.
# Usage: bash scripts/data_parallel_training.sh [OUT=/tmp/dp-run] ; results in $OUT/summary.json
set -euo pipefail
OUT=${OUT:-/tmp/dp-run}
N=${N:-48}; STEPS=${STEPS:-60}; BATCH=${BATCH:-8}
PROMPTS=${PROMPTS:-../shared/data/prompts/train.jsonl}
CHIMERA=${CHIMERA:-.venv/bin/chimera}
mkdir -p "$OUT"
head -n "$N" "$PROMPTS" > "$OUT/prompts.jsonl"
for P in 1 2; do
  /usr/bin/time -f "%e" -o "$OUT/distill-$P.s" "$CHIMERA" distill --prompts "$OUT/prompts.jsonl" --out "$OUT/data-$P" \
    --max-new-tokens 96 --batch-size 8 --num-processes "$P" --device cpu > "$OUT/distill-$P.json"
done
cmp "$OUT/data-1/tokens.bin" "$OUT/data-2/tokens.bin" && cmp "$OUT/data-1/mask.bin" "$OUT/data-2/mask.bin"
for P in 1 2; do
  /usr/bin/time -f "%e" -o "$OUT/train-$P.s" "$CHIMERA" train --data "$OUT/data-1" --out "$OUT/train-$P" \
    --steps "$STEPS" --batch-size "$BATCH" --max-len 256 --roots-per-seq 32 --depth 4 --eval-every "$STEPS" \
    --save-every "$STEPS" --heldout-fraction 0.15 --cache-base --num-processes "$P" --device cpu > "$OUT/train-$P.json"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {"data_identical": True}
for p in (1, 2):
    log = [json.loads(l) for l in (out / f"train-{p}" / "log.jsonl").read_text().splitlines()]
    summary[f"{p}_process"] = {"distill_s": float((out / f"distill-{p}.s").read_text()),
                               "train_s": float((out / f"train-{p}.s").read_text()),
                               "final_loss": log[-1]["loss"], "heldout_top1": log[-1]["heldout"]["top1"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
