# Sourced by the device scripts after they set RES (their results folder): the environment, the staged model
# (stage_model.sh), and step NAME, which appends a timestamped line to $RES/progress.txt for the polling calls.
# Poll back to back and copy results to $OUT as they come: a machine idle for 30 s between calls is handed back with
# everything on it (session 11 lost a bench's files and the variants' JSON that way).
set -uo pipefail
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=.:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
step() { echo "$(date +%T) $1" >> "$RES/progress.txt"; }
bash scripts/device/stage_model.sh 2>> "$RES/progress.txt" || { step "staging failed: nothing was run"; exit 1; }
