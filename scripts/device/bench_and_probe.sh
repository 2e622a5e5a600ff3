#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4), session 10:
# 1. `chimera bench` in bfloat16: hf-compiled, ar, chimera, 8 questions a category, 256 new tokens (the headline);
# 2. the step-cost probe's 8B plain step with inductor's default settings, then with coordinate-descent tuning of
#    its kernels, then with max-autotune of the matrix products (scripts/step_cost_probe.py --plain-only);
# 3. scripts/decode_profile.py (where a turn's time goes), after this session's prefill change.
# Start it with setsid; results and progress.txt in $HOME/res-bench: tar czf $OUT/res.tgz -C $HOME res-bench
RES=$HOME/res-bench
. scripts/device/prepare.sh
Q=$HOME/stage/spec_bench.jsonl
step bench-bf16
python3 -m chimera.cli bench --questions "$Q" --limit "${LIMIT:-8}" --max-new-tokens 256 \
  --methods hf-compiled ar chimera --device cuda --out "$RES/gpu_bench_bf16" > "$RES/gpu_bench_bf16.log" 2>&1
step probe-default
python3 scripts/step_cost_probe.py --shapes 8b --no-hf --plain-only --configs compiled \
  --out "$RES/probe_8b_default.json" > "$RES/probe_default.log" 2>&1
step probe-coordinate-descent
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 python3 scripts/step_cost_probe.py --shapes 8b --no-hf --plain-only \
  --configs compiled --out "$RES/probe_8b_cdt.json" > "$RES/probe_cdt.log" 2>&1
step probe-max-autotune
TORCHINDUCTOR_MAX_AUTOTUNE=1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 python3 scripts/step_cost_probe.py \
  --shapes 8b --no-hf --plain-only --configs compiled --out "$RES/probe_8b_max_autotune.json" \
  > "$RES/probe_max_autotune.log" 2>&1
step profile
python3 scripts/decode_profile.py --questions "$Q" --limit 8 --out "$RES/decode_profile.json" > "$RES/profile.log" 2>&1
step done
