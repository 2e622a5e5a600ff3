#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4), session 15: the GPU's calibration (`chimera calibrate` in bfloat16:
# every candidate dynamic tree and draft vocabulary decoded, its choice and time as JSON), then `chimera bench` in
# bfloat16 (hf-compiled, ar, chimera; LIMIT questions a category, 256 new tokens), whose `chimera` takes the tree the
# calibration chose (read from the cache it wrote), then the float32 graph check against generate.
# Start it with setsid; results and progress.txt in $HOME/res-cal, copied to $OUT by each polling call.
RES=$HOME/res-cal
. scripts/device/prepare.sh
step calibrate
python3 -m chimera.cli calibrate --device cuda --dtype bfloat16 --json \
  > "$RES/calibration.json" 2> "$RES/calibration.log"
bench_bf16
check_fp32
step done
