#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): where a step's host time goes, steps launched ahead or not (scripts/step_profile.py).
# Start it with setsid; results and progress.txt in $HOME/res-profile: tar czf $OUT/res.tgz -C $HOME res-profile
RES=$HOME/res-profile
. scripts/device/prepare.sh
step profile
python3 scripts/step_profile.py --questions "$HOME/stage/spec_bench.jsonl" --limit 1 --out "$RES/step_profile.txt" \
  > "$RES/step_profile.log" 2>&1
step done
