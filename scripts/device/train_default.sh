#!/usr/bin/env bash
# The GPU pipeline that trains the shipped drafter for smollm2-135m-instruct (see docs/training.md).
# Runs on the device machine after the staging calls of ../shared/device/README.md (train.jsonl and
# spec_bench.jsonl copied to $HOME/stage), from a snapshot of the repository, in the background:
#   1. self-distillation of the training prompts for DISTILL_SECONDS (the data store is kill-safe); the last
#      HELDOUT prompts are kept out of it and distilled separately as unseen data,
#   2. the base's token counts on the distilled answers (scripts/token_frequencies.py),
#   3. drafter training for STEPS steps at DEPTH heads, bf16 autocast, exported in bf16; INIT starts from a
#      saved drafter (its extra heads start as copies of its last one),
#   4. the export split into parts under 16 MiB (what one file coming back from the machine may weigh),
#   5. with HELDOUT > 0: per-depth agreement and acceptance profile on the unseen answers, for the new drafter
#      and for COMPARE (a drafter directory, e.g. the one shipped before), and tau of both on TAU_LIMIT
#      questions of each MT-bench category with the dynamic tree.
# Session 1's drafter: MAX_LEN=512 DISTILL_SECONDS=420 DISTILL_BATCH=384 STEPS=6000 (defaults below otherwise).
# FEATURE_LAYERS=2,15,27: the drafter reads the base's states after those layers too (chimera train --feature-layers).
# MAX_LEN=N: cut each sample to its first N tokens (chimera train --max-len; by default each trains whole, up to
# 1,024 prompt tokens and 256 answer tokens; the drafters of rounds 1 and 2 trained with 512).
# KL=1: the heads learn the base's whole distribution instead of its argmax (chimera train --kl).
# SAMPLED_SECONDS=N: after the greedy answers, N seconds more of answers sampled at TEMPERATURE (default 0.8) to the
# same prompts, trained on beside them (chimera train --data GREEDY SAMPLED; each prompt's answers held out together).
set -euo pipefail
DISTILL_SECONDS=${DISTILL_SECONDS:-420}
DISTILL_BATCH=${DISTILL_BATCH:-768}
STEPS=${STEPS:-8000}
DEPTH=${DEPTH:-6}
LR=${LR:-2e-3}
WARMUP=${WARMUP:-200}
INIT=${INIT:-}
FEATURE_LAYERS=${FEATURE_LAYERS:-}
KL=${KL:-}
MAX_LEN=${MAX_LEN:-}
SAMPLED_SECONDS=${SAMPLED_SECONDS:-0}
TEMPERATURE=${TEMPERATURE:-0.8}
HELDOUT=${HELDOUT:-0}
COMPARE=${COMPARE:-}
TAU_LIMIT=${TAU_LIMIT:-1}
RUN=${RUN:-$HOME/run}
mkdir -p "$RUN/export"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/snapshot:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd "$HOME/snapshot"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RUN/export/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
total=$(wc -l < "$HOME/stage/train.jsonl")
head -n $((total - HELDOUT)) "$HOME/stage/train.jsonl" > "$RUN/train_prompts.jsonl"
timeout -s INT "$DISTILL_SECONDS" python3 -m chimera.cli distill --prompts "$RUN/train_prompts.jsonl" \
  --out "$RUN/data" --max-new-tokens 256 --batch-size "$DISTILL_BATCH" --dtype bfloat16 --device cuda || true
python3 -c "from chimera.train.data import DistillStore as S; print('samples', len(S('$RUN/data')))"
DATA=("$RUN/data")
if [ "$SAMPLED_SECONDS" -gt 0 ]; then
  timeout -s INT "$SAMPLED_SECONDS" python3 -m chimera.cli distill --prompts "$RUN/train_prompts.jsonl" \
    --out "$RUN/sampled" --max-new-tokens 256 --batch-size "$DISTILL_BATCH" --temperature "$TEMPERATURE" --seed 1 \
    --dtype bfloat16 --device cuda || true
  python3 -c "from chimera.train.data import DistillStore as S; print('sampled', len(S('$RUN/sampled')))"
  DATA+=("$RUN/sampled")
fi
python3 scripts/token_frequencies.py --data "$RUN/data" --out "$RUN/export/token_counts.safetensors"
max_len_flag=(${MAX_LEN:+--max-len "$MAX_LEN"})
python3 -m chimera.cli train --data "${DATA[@]}" --out "$RUN/train" --steps "$STEPS" --batch-size 32 \
  "${max_len_flag[@]}" --roots-per-seq 64 --depth "$DEPTH" --lr "$LR" --warmup-steps "$WARMUP" --eval-every 500 \
  --save-every 500 --dtype bfloat16 --device cuda --export-dtype bfloat16 ${INIT:+--init "$INIT"} \
  ${FEATURE_LAYERS:+--feature-layers "$FEATURE_LAYERS"} ${KL:+--kl}
cp "$RUN/train/drafter/config.json" "$RUN/train/log.jsonl" "$RUN/export/"
split -b 15M "$RUN/train/drafter/model.safetensors" "$RUN/export/weights.part."
sha256sum "$RUN/train/drafter/model.safetensors" > "$RUN/export/sha256.txt"
echo TRAINING_DONE
if [ "$HELDOUT" -gt 0 ]; then
  tail -n "$HELDOUT" "$HOME/stage/train.jsonl" > "$RUN/heldout_prompts.jsonl"
  python3 -m chimera.cli distill --prompts "$RUN/heldout_prompts.jsonl" --out "$RUN/heldout" --max-new-tokens 256 \
    --batch-size 512 --dtype bfloat16 --device cuda
  python3 scripts/acceptance_profile.py --drafter "$RUN/train/drafter" --data "$RUN/heldout" \
    --out "$RUN/profiled" "${max_len_flag[@]}" --dtype bfloat16 --device cuda | tee "$RUN/export/heldout_new.json"
  cp "$RUN/profiled/config.json" "$RUN/export/config.json"
  [ -n "$COMPARE" ] && python3 scripts/acceptance_profile.py --drafter "$COMPARE" --data "$RUN/heldout" \
    --out "$RUN/compare_profiled" "${max_len_flag[@]}" --dtype bfloat16 --device cuda \
    | tee "$RUN/export/heldout_compare.json"
  echo PROFILE_DONE
  for d in "$RUN/profiled" $COMPARE; do
    python3 scripts/compare_trees.py --questions "$HOME/stage/spec_bench.jsonl" --categories mt_bench \
      --limit "$TAU_LIMIT" --max-new-tokens 256 --device cuda --drafter "$d" --trees dynamic-64 \
      --out "$RUN/export/tau_$(basename "$d").json"
  done
fi
echo PIPELINE_DONE
