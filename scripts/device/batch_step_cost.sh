#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4): where a running batch's plain step goes in bfloat16
# (scripts/batch_step_cost.py: the whole step, the captured forward alone, the host's rest, for 1/4/16/64 sequences
# over 256/1024/2048-slot windows, a join's time, and the time RunningBatch.warm_up takes to capture every shape;
# COMPILE=off for the uncompiled step, session 16's first run; and the kernels of one 64-row forward), then
# `chimera throughput` (METHODS, default "ar chimera") at 1, 4, 16 and 64 clients with the batch's shapes captured
# before the timing, the tree given as the calibration chose it on an H100 in session 15.
# Start it with setsid; results and progress.txt in $HOME/res-batch, copied to $OUT by each polling call.
RES=$HOME/res-batch
. scripts/device/prepare.sh
step batch-step-cost
python3 scripts/batch_step_cost.py --compile "${COMPILE:-auto}" --profile 64 --out "$RES/batch_step_cost.json" > "$RES/batch_step_cost.log" 2>&1
step throughput
python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit 11 --concurrency 1 4 16 64 \
  --max-new-tokens 128 --methods ${METHODS:-ar chimera} --max-batch 64 --tree dynamic-64-8-3 --draft-vocab 16384 --device cuda \
  --out "$RES/throughput" > "$RES/throughput.log" 2>&1
step done
