#!/usr/bin/env bash
# On the device machine, in one call with no model staged: a running batch's compiled drafted step beside its plain
# step, on random weights of the default model's shape (timings do not depend on the weights; the tokens a step
# emits do, so they say nothing of tau here). The call carries .device/rand: tok/ (SmolLM2-135M's config.json and
# tokenizer) and wheels/ (pydantic, which the device image lacks).
# `python scripts/batch_step_cost.py --random-weights .device/rand/tok --windows 1024 --draft-depth 3 --profile 16`:
# each rows bucket's compiled plain and drafted step, and the parts of a drafted step (draft, verify, accept and
# read: kernels and device time) per rows bucket. Start it with setsid; results in $HOME/res-chains.
set -uo pipefail
RES=$HOME/res-chains
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=.:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target "$HOME/site" \
  .device/rand/wheels/*.whl
echo "$(date +%T) batch-step-cost" >> "$RES/progress.txt"
python3 scripts/batch_step_cost.py --random-weights .device/rand/tok --windows 1024 --draft-depth "${DEPTH:-3}" \
  --profile 16 --out "$RES/batch_step_cost.json" > "$RES/batch_step_cost.log" 2>&1
echo "$(date +%T) done" >> "$RES/progress.txt"
