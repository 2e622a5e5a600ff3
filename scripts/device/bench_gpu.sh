#!/usr/bin/env bash
# The GPU session behind docs/benchmarks.md: run on the device machine after the staging calls (see
# docs/training.md), from a snapshot of the repository, detached with setsid (a plain background job ends
# with the device call that started it), logging to $HOME/bench.log.
#   0. a one-question smoke run of every bench method (fails fast on a device-specific bug),
#   1. self-distillation of the first prompts for DISTILL_SECONDS, and of the last HELDOUT prompts, which the
#      shipped drafter never saw (its acceptance profile is measured on those),
#   2. Medusa heads trained by the same pipeline on the same data, exported in bf16,
#   3. the shipped Chimera drafter's acceptance profile (so --tree auto can size its tree for the GPU),
#   4. chimera bench, float32 (exactness is checked in float32), LIMIT questions per category.
set -euo pipefail
DISTILL_SECONDS=${DISTILL_SECONDS:-270}
HELDOUT=${HELDOUT:-512}
MEDUSA_STEPS=${MEDUSA_STEPS:-3000}
LIMIT=${LIMIT:-5}
RUN=$HOME/run
OUT_DIR=$RUN/export
mkdir -p "$RUN" "$OUT_DIR"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/snapshot:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd "$HOME/snapshot"
SHIPPED=chimera/assets/drafters/smollm2-135m-instruct
Q=$HOME/stage/spec_bench.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_SMOKE:-}" ]; then
  python3 -m chimera.cli bench --questions "$Q" --categories qa --limit 1 --max-new-tokens 16 --device cuda \
    --chimera-drafter random --medusa-drafter random --warmup 1 --out "$RUN/smoke"
  echo SMOKE_DONE
fi
tail -n "$HELDOUT" "$HOME/stage/train.jsonl" > "$RUN/heldout.jsonl"
python3 -m chimera.cli distill --prompts "$RUN/heldout.jsonl" --out "$RUN/heldout" --max-new-tokens 256 \
  --batch-size 512 --dtype bfloat16 --device cuda
timeout -s INT "$DISTILL_SECONDS" python3 -m chimera.cli distill --prompts "$HOME/stage/train.jsonl" \
  --out "$RUN/data" --max-new-tokens 256 --batch-size 768 --dtype bfloat16 --device cuda || true
python3 -c "from chimera.train.data import DistillStore as S; print('samples', len(S('$RUN/data')))"
echo DISTILL_DONE
python3 scripts/acceptance_profile.py --drafter "$SHIPPED" --data "$RUN/heldout" --out "$RUN/chimera" \
  --device cuda | tee "$OUT_DIR/chimera_profile.json"
python3 -m chimera.cli train --architecture medusa --data "$RUN/data" --out "$RUN/medusa" --steps "$MEDUSA_STEPS" \
  --batch-size 32 --max-len 512 --roots-per-seq 64 --depth 6 --lr 2e-3 --warmup-steps 200 --eval-every 500 \
  --save-every 1000 --dtype bfloat16 --device cuda --export-dtype bfloat16
python3 scripts/acceptance_profile.py --drafter "$RUN/medusa/drafter" --data "$RUN/heldout" --out "$RUN/medusa_profiled" \
  --device cuda | tee "$OUT_DIR/medusa_profile.json"
cp -r "$RUN/medusa_profiled" "$OUT_DIR/medusa"
cp "$RUN/chimera/config.json" "$OUT_DIR/chimera_config.json"
cp "$RUN/medusa/log.jsonl" "$OUT_DIR/medusa_log.jsonl"
echo TRAIN_DONE
python3 -m chimera.cli bench --questions "$Q" --limit "$LIMIT" --max-new-tokens 256 --device cuda --dtype float32 \
  --chimera-drafter "$RUN/chimera" --medusa-drafter "$RUN/medusa_profiled" --out "$RUN/bench_gpu"
cp -r "$RUN/bench_gpu" "$OUT_DIR/bench_gpu"
echo PIPELINE_DONE
