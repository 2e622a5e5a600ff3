#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5..q7 copied to $HOME/stage, this call carrying
# .device/q4): graph launch costs, each captured graph's kernels and times, acceptance's host time and the loop's
# host split (scripts/step_anatomy.py). Start it with setsid; results in $HOME/res-anatomy.
RES=$HOME/res-anatomy
. scripts/device/prepare.sh
step anatomy
python3 scripts/step_anatomy.py --questions "$HOME/stage/spec_bench.jsonl" --limit 1 --out "$RES/step_anatomy.json" \
  > "$RES/step_anatomy.log" 2>&1
step done
