#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4): issue #15's and #16's step-cost probe on random-weight Llama shapes
# (scripts/step_cost_probe.py), bfloat16, the base's forward and the drafter's levels compiled, as the decoder runs
# by default (until session 27 the drafter's levels ran op by op here: CONFIGS=compiled). For each shape in SHAPES
# (default 8b): our plain step as decoding runs and its share of the rated bandwidth, the compiled plain step's
# kernels by kind, and the speculative step (draft / verify / other, r) with each tree of TREES (default: the issues'
# 64-node, 8-level tree over the whole vocabulary, and the GPU's calibrated choice for the default model in session
# 25, 32 nodes, 3 levels, 16,384 draft tokens). HF=1 adds hf-compiled's time per token (its compilation takes
# minutes); ATTENTION="repeated grouped folded" times each of the verifier's attention routes
# (verifier.SlotVerifier's attention_route; default folded, the decoder's with a compiled forward since session 28);
# PLAIN_ONLY=1 leaves the trees out; AUTOTUNE=1 lets inductor time Triton templates against cuBLAS for the matrix
# products (the trees' many-token products), its results under a name of their own; GEMM=1 first times the 8B shape's
# products alone at 1 to 128 tokens (scripts/gemm_bandwidth.py).
# Start it with setsid; results and progress.txt in $HOME/res-probe, copied to $OUT by each polling call.
RES=$HOME/res-probe
. scripts/device/prepare.sh
if [ -n "${GEMM:-}" ]; then
  step gemm-bandwidth
  python3 scripts/gemm_bandwidth.py --out "$RES/gemm_bandwidth.json" > "$RES/gemm_bandwidth.log" 2>&1
fi
for shape in ${SHAPES:-8b}; do
  step "probe-$shape"
  name="step_cost_probe_$shape${AUTOTUNE:+_autotune}"
  python3 scripts/step_cost_probe.py --shapes "$shape" --configs ${CONFIGS:-compiled_drafter} --kernels \
    $([ -n "${HF:-}" ] || echo --no-hf) --attention ${ATTENTION:-folded} ${PLAIN_ONLY:+--plain-only} \
    ${AUTOTUNE:+--max-autotune-gemm} --trees ${TREES:-dynamic-64-8-8:full dynamic-32-8-3:16384} \
    --out "$RES/$name.json" > "$RES/$name.log" 2>&1
done
step done
