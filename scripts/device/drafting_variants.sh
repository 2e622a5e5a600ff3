#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): each drafting variant alone on the default model (scripts/drafting_variants.py: the drafter's
# drafting compiled or not, draft vocabulary full / 16384 / 8192, with ar and hf-compiled on the same 48
# Spec-Bench prompts), then the step-cost probe's 8B shape with the drafter compiled and not. ROUTES=1: the default
# variant (its verifier's attention "folded" since session 28) and the other attention routes only
# (SpeculativeDecoder's attention_route, with `ar` over each route), and no probe (scripts/device/step_probe.sh times
# the routes on the random shapes).
# Start it with setsid; results and progress.txt in $HOME/res-drafting: tar czf $OUT/res.tgz -C $HOME res-drafting
RES=$HOME/res-drafting
. scripts/device/prepare.sh
step variants
if [ -n "${ROUTES:-}" ]; then
  variants=(--variants default "verifier steps grouped" "verifier attention repeated (transformers')")
else
  variants=()
fi
python3 scripts/drafting_variants.py --questions "$HOME/stage/spec_bench.jsonl" --limit 8 --hf-compiled \
  "${variants[@]}" --out "$RES/drafting_variants.json" > "$RES/variants.log" 2>&1
if [ -z "${ROUTES:-}" ]; then
  step probe-8b
  python3 scripts/step_cost_probe.py --shapes 8b --no-hf --configs compiled compiled_drafter \
    --out "$RES/step_cost_probe_8b.json" > "$RES/probe.log" 2>&1
fi
step done
