#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3, q5 and q6 copied to $HOME/stage, this call carrying
# .device/q4): `chimera bench` in bfloat16 (hf-compiled, ar, chimera; LIMIT questions a category, 256 new tokens).
# Start it with setsid; results and progress.txt in $HOME/res-bf16: tar czf $OUT/res.tgz -C $HOME res-bf16
RES=$HOME/res-bf16
. scripts/device/prepare.sh
step bench-bf16
python3 -m chimera.cli bench --questions "$HOME/stage/spec_bench.jsonl" --limit "${LIMIT:-8}" --max-new-tokens 256 \
  --methods hf-compiled ar chimera --device cuda --out "$RES/gpu_bench_bf16" > "$RES/gpu_bench_bf16.log" 2>&1
step done
