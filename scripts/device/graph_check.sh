#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): float32 decoding through CUDA graphs, compiled or not, with and without the drafter, token for token
# against model.generate (prepare.sh's check_fp32; ROUTE: the verifier attention route, default repeated, as
# float32 decodes by default). Start it with setsid; results in $HOME/res-check.
RES=$HOME/res-check
. scripts/device/prepare.sh
check_fp32 ${ROUTE:-}
step done
