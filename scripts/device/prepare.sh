# Sourced by the device scripts after they set RES (their results folder): the environment, the staged model
# (stage_model.sh), and step NAME, which appends a timestamped line to $RES/progress.txt for the polling calls.
set -uo pipefail
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=.:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bash scripts/device/stage_model.sh
step() { echo "$(date +%T) $1" >> "$RES/progress.txt"; }
