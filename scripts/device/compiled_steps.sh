#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): the compaction and the drafter's levels compiled (session 12), measured four ways: `chimera bench`
# in bfloat16 (hf-compiled, ar, chimera; 8 questions a category, 256 new tokens), the float32 graph check against
# generate (scripts/gpu_graph_check.py), the step anatomy (scripts/step_anatomy.py), and drafting inside the running
# batch against the plain batch (`chimera throughput --batch-drafting`, session 12's CPU loser), last as the least needed.
# Start it with setsid; results and progress.txt in $HOME/res-compiled, copied to $OUT by each polling call.
RES=$HOME/res-compiled
. scripts/device/prepare.sh
bench_bf16
check_fp32
step anatomy
python3 scripts/step_anatomy.py --questions "$HOME/stage/spec_bench.jsonl" --limit 1 --out "$RES/step_anatomy.json" \
  > "$RES/step_anatomy.log" 2>&1
step throughput
python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit 4 --concurrency 4 16 \
  --max-new-tokens 64 --methods ar chimera --batch-drafting --max-batch 16 --device cuda \
  --out "$RES/throughput_batch_drafting" > "$RES/throughput.log" 2>&1
step done
