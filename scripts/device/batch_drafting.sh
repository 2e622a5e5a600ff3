#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4): a running batch that drafts every row's chain at once
# (chimera/drafters/rows.py) against one that does not. First scripts/batch_exactness_check.py in float32 (graphed
# batches, plain and drafting, token for token against decoding alone), then scripts/batch_step_cost.py with
# --draft-depth (DEPTH, default 3): each rows bucket's compiled plain step beside its compiled drafted step; then
# `chimera throughput` at 1, 4, 16 and 64 clients, `ar` and `chimera` with --batch-drafting (the batch drafts where
# its switch measures that it pays, per power-of-two size), the tree of a request alone as the calibration chose it
# on an H100 in session 15.
# Last, the exactness check in bfloat16 (compiled batches; the share identical to decoding alone).
# On a fresh machine compiling takes most of the time: session 17's first attempt compiled for 438 s inside the
# throughput run (the lone decoder's shapes 180 s, the batch's prefills, steps and chains) and measured nothing in
# its 850 s; the step costs now come first, and the throughput run reads back what they compiled.
# RUNS (default: fp32 step-cost throughput bf16, run in the order below) picks some of fp32, attention (one layer's
# attention of a plain step and of a chain's verification by each route, scripts/batch_attention_kernels.py: no model,
# its compiled routes a few minutes), step-cost, step-cost-per-depth (the same with the chains verified by one compiled
# forward a depth), step-cost-folded (with a chain's query heads folded), step-cost-heads (with a chain's query tokens
# read as query heads), throughput and bf16. CONCURRENCY: the
# throughput's client counts (default 1 4 16 64; leaving 1 and 4 out spares the lone decoder's compilation, about
# 180 s fresh). PROFILE=R adds the parts of a drafted step of R rows (draft, verify, accept) to the step costs;
# THROUGHPUT_LIMIT the throughput's questions a category (default 40: 240 first turns; session 19's 11 a category made
# runs of 0.7-1.5 s on an H200). WINDOWS the step costs' windows of slots (default 1024; since session 20 a compiled
# step attends over its window, not every slot: e.g. WINDOWS="256 1024 2048").
# Start it with setsid; results and progress.txt in $HOME/res-drafting, copied to $OUT by each polling call.
RES=$HOME/res-drafting
RUNS=${RUNS:-fp32 step-cost throughput bf16}
. scripts/device/prepare.sh
part() { [[ " $RUNS " == *" $1 "* ]]; }
if part fp32; then
  step check-fp32
  python3 scripts/batch_exactness_check.py --dtype float32 --out "$RES/batch_exactness_fp32.json" \
    > "$RES/batch_exactness_fp32.log" 2>&1
fi
if part attention; then
  step attention
  python3 scripts/batch_attention_kernels.py --rows 16 64 --slots 1024 2048 --queries 1 4 \
    --out "$RES/batch_attention_kernels.json" > "$RES/batch_attention_kernels.log" 2>&1
fi
# step_cost NAME [ARGS]: scripts/batch_step_cost.py with the drafted step beside the plain one, in a process of its own
# (one variant of the verifying forward a process: Dynamo reuses whichever compiled first), into $RES/NAME.json
step_cost() {
  local name=$1; shift
  step "$name"
  python3 scripts/batch_step_cost.py --windows ${WINDOWS:-1024} --draft-depth "${DEPTH:-3}" --profile "${PROFILE:-0}" \
    "$@" --out "$RES/$name.json" > "$RES/$name.log" 2>&1
}
part step-cost && step_cost batch_step_cost
part step-cost-per-depth && step_cost batch_step_cost_per_depth --verify-graphs per-depth
part step-cost-folded && step_cost batch_step_cost_folded --chain-attention folded
part step-cost-heads && step_cost batch_step_cost_heads --chain-attention heads
part throughput && throughput_run
if part bf16; then
  step check-bf16
  python3 scripts/batch_exactness_check.py --dtype bfloat16 --out "$RES/batch_exactness_bf16.json" \
    > "$RES/batch_exactness_bf16.log" 2>&1
fi
step done
