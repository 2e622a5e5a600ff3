#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q3 and q5 copied to $HOME/stage, this call carrying
# .device/q4): where a bench turn's time goes in our loop (scripts/decode_profile.py), 8 Spec-Bench questions a
# category, bfloat16. Start it with setsid; results in $HOME/res-profile: tar czf $OUT/res.tgz -C $HOME res-profile
set -uo pipefail
RES=$HOME/res-profile
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=.:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bash scripts/device/stage_model.sh
echo "$(date +%T) profile" >> "$RES/progress.txt"
python3 scripts/decode_profile.py --questions "$HOME/stage/spec_bench.jsonl" --limit 8 \
  --out "$RES/decode_profile.json" > "$RES/profile.log" 2>&1
echo "$(date +%T) done" >> "$RES/progress.txt"
