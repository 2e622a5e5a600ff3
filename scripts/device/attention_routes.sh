#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): whether a verifier attention route (verifier.SlotVerifier's attention_route, attention.VERIFIER_ATTENTION)
# earns adoption, in one job, most telling first:
#   1. the 8B shape's step-cost probe over ROUTES (default "repeated folded"): plain step, the issues' 64-node tree's
#      verify over plain and r, kernels by kind, the drafter compiled as decoding runs by default (#15, #16);
#   2. the default model with its shipped drafter, bfloat16, over the same routes (the default variant: the decoder's
#      own, "folded" since session 28), `ar` over each route beside it (scripts/drafting_variants.py, LIMIT questions
#      a category, default 4; no hf-compiled);
#   3. the float32 graph check of every non-default route in ROUTES against generate (scripts/gpu_graph_check.py).
# Start it with setsid; results and progress.txt in $HOME/res-routes, copied to $OUT by each polling call.
RES=$HOME/res-routes
. scripts/device/prepare.sh
ROUTES=${ROUTES:-repeated folded}
probe_8b "$ROUTES" dynamic-64-8-8:full
step variants
variants=(default)
for route in $ROUTES; do
  case $route in
    repeated) variants+=("verifier attention repeated (transformers')") ;;
    grouped) variants+=("verifier steps grouped") ;;
  esac
done
python3 scripts/drafting_variants.py --questions "$HOME/stage/spec_bench.jsonl" --limit "${LIMIT:-4}" \
  --variants "${variants[@]}" --out "$RES/drafting_variants.json" > "$RES/variants.log" 2>&1
for route in $ROUTES; do
  [ "$route" = repeated ] || PROMPTS=${PROMPTS:-3} check_fp32 "$route"
done
step done
