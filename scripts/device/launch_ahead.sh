#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): speculative steps launched before the last one is read (chimera/steps.py), measured three ways:
# `chimera bench` in bfloat16 (hf-compiled, ar, chimera; 8 questions a category, 256 new tokens), the float32 graph
# check against generate (scripts/gpu_graph_check.py), and the drafting variants on 4 questions a category
# (launched ahead or not, tree sizes and depths: scripts/drafting_variants.py), last as the least needed.
# Start it with setsid; results and progress.txt in $HOME/res-ahead: tar czf $OUT/res.tgz -C $HOME res-ahead
RES=$HOME/res-ahead
. scripts/device/prepare.sh
bench_bf16
check_fp32
step variants
python3 scripts/drafting_variants.py --questions "$HOME/stage/spec_bench.jsonl" --limit "${VARIANTS_LIMIT:-4}" \
  --variants default "steps read before the next is launched" \
  --out "$RES/drafting_variants.json" > "$RES/variants.log" 2>&1
step done
