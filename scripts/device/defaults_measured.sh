#!/usr/bin/env bash
# On the device machine, staging the model as it runs (below): the decoder's defaults as they stand, against the open
# issues' targets, most wanted first:
#   1. the 8B shape's step-cost probe in the default configuration (base forward and drafter's levels compiled, the
#      verifier's attention folded since session 28) with TREES (default: session 25's calibrated tree for the
#      default model, 32 nodes, 3 levels, 16,384 draft tokens): plain step, drafting's share of it, r (#15, #16);
#   2. `chimera bench` in bfloat16 (hf-compiled, ar, chimera; LIMIT questions a category, default 8; 256 new tokens),
#      the headline and the "identical to ar" rate (#15, #16);
#   3. the float32 graph check of the folded route's trees against generate (scripts/gpu_graph_check.py), which
#      session 28's device time ended before;
#   4. `chimera throughput` at 1, 16 and 64 clients (#17), if the lease lasts.
# PARTS: the parts, in order (default "probe bench check throughput"); the model is waited for before the first part
# that needs it, so a probe named first runs while the model is staged. A short lease: PARTS="bench check", or
# PARTS=probe, which needs no staging call at all.
# Start it with setsid in the call that stages q7, carrying .device/q7 (MODEL_LATER: the probe needs only the
# tokenizer):
#   mkdir -p $HOME/stage && cp -r .device/q7/* $HOME/stage/ && cp -r . $HOME/proj && cd $HOME/proj &&
#   (setsid nohup bash scripts/device/defaults_measured.sh > $HOME/x.out 2>&1 &)
# then stage q1..q6 while the probe runs, one call each carrying .device/qN:
#   mkdir -p $HOME/stage && cp -r .device/qN/* $HOME/stage/ && touch $HOME/stage/qN.done && ls -la $HOME/stage
# Results and progress.txt in $HOME/res-defaults, copied to $OUT by each polling call.
RES=$HOME/res-defaults
MODEL_LATER=1
. scripts/device/prepare.sh
probe() { probe_8b folded "${TREES:-dynamic-32-8-3:16384}"; }
staged=
with_model() { [ -n "$staged" ] || { model_staged; staged=1; }; }  # waits for the staging calls, once
for part in ${PARTS:-probe bench check throughput}; do
  case $part in
    probe) probe ;;  # needs no weights: first, it runs while the model is staged
    bench) with_model; bench_bf16 ;;
    check) with_model; PROMPTS=${PROMPTS:-3} check_fp32 folded ;;  # ~3 min
    throughput) with_model; CONCURRENCY=${CONCURRENCY:-1 16 64} throughput_run ;;  # issue #17's 16 and 64 clients
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
step done
