#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): where a bench turn's time goes in our loop (scripts/decode_profile.py), 8 Spec-Bench questions a
# category, bfloat16. Start it with setsid; results in $HOME/res-profile: tar czf $OUT/res.tgz -C $HOME res-profile
RES=$HOME/res-profile
. scripts/device/prepare.sh
step profile
python3 scripts/decode_profile.py --questions "$HOME/stage/spec_bench.jsonl" --limit 8 \
  --out "$RES/decode_profile.json" > "$RES/profile.log" 2>&1
step done
