#!/usr/bin/env bash
# On the device machine, after the staging calls (../shared/device/README.md; the third also copies
# spec_bench.jsonl to $HOME/stage): graph decoding with static and dynamic trees (exactness against generate,
# tokens/s), tau of those trees on 16 MT-bench questions, then `chimera bench` with the default (auto) trees.
# Detached with setsid, logging to $HOME/bench3.log; results in $RUN (default $HOME/run3/).
# TREES picks the trees of the graph check; TAU=0 skips the tau comparison.
set -euo pipefail
LIMIT=${LIMIT:-4}
RUN=${RUN:-$HOME/run3}
TREES=${TREES:-64 dynamic-64 dynamic-96 dynamic-128 dynamic-64-12}
TAU=${TAU:-1}
mkdir -p "$RUN"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/snapshot:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd "$HOME/snapshot"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$RUN/gpu.txt"
# shellcheck disable=SC2086
python3 scripts/gpu_graph_check.py --prompts 4 --max-new-tokens 128 --trees $TREES | tee "$RUN/graph_check.txt"
echo CHECK_DONE
[ "$TAU" = 1 ] && python3 scripts/compare_trees.py --questions "$HOME/stage/spec_bench.jsonl" --categories mt_bench --limit 16 \
  --max-new-tokens 256 --device cuda --trees 64 dynamic-64 dynamic-96 dynamic-128 --out "$RUN/tau_mt16.json"
echo TAU_DONE
python3 -m chimera.cli bench --questions "$HOME/stage/spec_bench.jsonl" --limit "$LIMIT" --max-new-tokens 256 \
  --device cuda --dtype float32 --out "$RUN/bench_gpu"
echo PIPELINE_DONE
