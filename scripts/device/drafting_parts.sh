#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4), session 13: drafting with its attention, the choice of candidates and
# the tree's choice compiled and a two-pass top-k over the vocabulary, measured four ways: the step anatomy with the
# drafting variants (scripts/step_anatomy.py), `chimera bench` in bfloat16 (hf-compiled, ar, chimera; 8 questions a
# category, 256 new tokens), drafting inside the running batch on the GPU (`chimera throughput --batch-drafting`),
# and the float32 graph check against generate, last as the least changed (float32 compiles nothing).
# Start it with setsid; results and progress.txt in $HOME/res-parts, copied to $OUT by each polling call.
RES=$HOME/res-parts
. scripts/device/prepare.sh
step anatomy
python3 scripts/step_anatomy.py --questions "$HOME/stage/spec_bench.jsonl" --limit 1 --out "$RES/step_anatomy.json" \
  > "$RES/step_anatomy.log" 2>&1
bench_bf16
step throughput
python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit 4 --concurrency 4 16 \
  --max-new-tokens 64 --methods ar chimera --batch-drafting --max-batch 16 --device cuda \
  --out "$RES/throughput_batch_drafting" > "$RES/throughput.log" 2>&1
check_fp32
step done
