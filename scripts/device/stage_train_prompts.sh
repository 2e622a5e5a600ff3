#!/usr/bin/env bash
# Here, not on the device: the training prompts that scripts/device/train_variants.sh distills there, packed to travel
# with its launching call (the whole of ../shared/data/prompts/train.jsonl, 5 MB gzipped, would push that call, with
# the project's tracked files and the model's last part, past its 64 MiB). COUNT (default 12000) of its first lines,
# which the shipped drafter was trained on, then its last HELDOUT (default 512), which no drafter was trained on.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
prompts=../shared/data/prompts/train.jsonl
mkdir -p .device/train
{ head -n "${COUNT:-12000}" "$prompts"; tail -n "${HELDOUT:-512}" "$prompts"; } | gzip -9 > .device/train/prompts.jsonl.gz
ls -la .device/train
