#!/usr/bin/env bash
# On the device machine, after the staging calls: check graph drafting (exactness and per-step split), then
# `chimera bench` with the shipped Chimera drafter and Medusa heads, float32, LIMIT questions per category.
# Detached with setsid, logging to $HOME/bench2.log; results in $HOME/run2/.
set -euo pipefail
LIMIT=${LIMIT:-4}
RUN=$HOME/run2
mkdir -p "$RUN"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/snapshot:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd "$HOME/snapshot"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 scripts/gpu_graph_check.py --prompts 4 --max-new-tokens 128 | tee "$RUN/graph_check.txt"
echo CHECK_DONE
python3 -m chimera.cli bench --questions "$HOME/stage/spec_bench.jsonl" --limit "$LIMIT" --max-new-tokens 256 \
  --device cuda --dtype float32 --out "$RUN/bench_gpu"
echo PIPELINE_DONE
