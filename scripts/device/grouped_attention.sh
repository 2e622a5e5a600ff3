#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4), session 14: the step anatomy (scripts/step_anatomy.py, ar and chimera
# with the automatic 6-deep tree), `chimera bench` in bfloat16 (hf-compiled, ar, chimera; 8 questions a category, 256
# new tokens), then the float32 graph check against generate. (Session 14 ran the anatomy with two more variants, the
# base's attention folding each group's query heads into one query on the GPU; that path lost and was removed, its
# figures are in docs/benchmarks.md.)
# Start it with setsid; results and progress.txt in $HOME/res-gqa, copied to $OUT by each polling call.
RES=$HOME/res-gqa
. scripts/device/prepare.sh
step anatomy
python3 scripts/step_anatomy.py --questions "$HOME/stage/spec_bench.jsonl" --limit 1 --out "$RES/step_anatomy.json" \
  --variants ar chimera > "$RES/step_anatomy.log" 2>&1
bench_bf16
check_fp32
step done
