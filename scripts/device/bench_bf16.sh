#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): `chimera bench` in bfloat16 (hf-compiled, ar, chimera; LIMIT questions a category, 256 new tokens), as
# prepare.sh's bench_bf16 runs it.
# Start it with setsid; results and progress.txt in $HOME/res-bf16: tar czf $OUT/res.tgz -C $HOME res-bf16
RES=$HOME/res-bf16
. scripts/device/prepare.sh
bench_bf16
step done
