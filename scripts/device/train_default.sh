#!/usr/bin/env bash
# The GPU pipeline that trained the shipped drafter for smollm2-135m-instruct (see docs/training.md).
# Runs on the device machine after the three staging calls of ../shared/device/README.md, from a snapshot
# of the repository, in the background, logging to $HOME/run.log:
#   1. self-distillation of the training prompts for DISTILL_SECONDS (the data store is kill-safe),
#   2. drafter training for STEPS steps, bf16 autocast, exported in bf16,
#   3. the export split into parts under 16 MiB (what one file coming back from the machine may weigh),
#   4. tau on 3 questions of each MT-bench category (bf16, so indicative only).
set -euo pipefail
DISTILL_SECONDS=${DISTILL_SECONDS:-420}
DISTILL_BATCH=${DISTILL_BATCH:-768}
STEPS=${STEPS:-8000}
RUN=$HOME/run
mkdir -p "$RUN"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/snapshot:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd "$HOME/snapshot"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout -s INT "$DISTILL_SECONDS" python3 -m chimera.cli distill --prompts "$HOME/stage/train.jsonl" \
  --out "$RUN/data" --max-new-tokens 256 --batch-size "$DISTILL_BATCH" --dtype bfloat16 --device cuda || true
python3 -c "from chimera.train.data import DistillStore as S; print('samples', len(S('$RUN/data')))"
python3 -m chimera.cli train --data "$RUN/data" --out "$RUN/train" --steps "$STEPS" --batch-size 32 \
  --max-len 512 --roots-per-seq 64 --depth 6 --lr 2e-3 --warmup-steps 200 --eval-every 500 --save-every 500 \
  --dtype bfloat16 --device cuda --export-dtype bfloat16
mkdir -p "$RUN/export"
cp "$RUN/train/drafter/config.json" "$RUN/train/log.jsonl" "$RUN/export/"
split -b 15M "$RUN/train/drafter/model.safetensors" "$RUN/export/weights.part."
sha256sum "$RUN/train/drafter/model.safetensors" > "$RUN/export/sha256.txt"
echo TRAINING_DONE
python3 scripts/eval_tau.py --drafter "$RUN/train/drafter" --questions "$HOME/stage/spec_bench.jsonl" \
  --categories writing roleplay reasoning math coding extraction stem humanities --limit 3 --tree large \
  --dtype bfloat16 --device cuda --out "$RUN/export/tau_mt_subset.json" || true
echo PIPELINE_DONE
