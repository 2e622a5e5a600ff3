#!/usr/bin/env bash
# On the device machine, after another job of this session staged the model: `chimera throughput` in bfloat16, 4
# first turns a Spec-Bench category (24 requests), 128 new tokens, at 1, 4 and 16 clients, for `ar` and `chimera`
# through the engine's running batch (a request decoding alone drafts; the batch itself decodes plain unless
# --batch-drafting). Batched `generate` is left out: eager, it would take most of the call at one client.
# CONCURRENCY="4 16" runs only those; LIMIT (default 4) questions a category, MAX_BATCH (default 16) the engine's batch;
# TREE and DRAFT_VOCAB (default auto: the GPU's calibration, minutes on a fresh machine) chimera's lone tree.
# Session 15: LIMIT=11 CONCURRENCY=64 MAX_BATCH=64 TREE=dynamic-64-8-3 DRAFT_VOCAB=16384 (what the calibration chose
# on an H100 that session). Results and progress.txt in $HOME/res-throughput.
RES=$HOME/res-throughput
. scripts/device/prepare.sh
step throughput
python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit "${LIMIT:-4}" \
  --concurrency ${CONCURRENCY:-1 4 16} --max-new-tokens 128 --methods ar chimera --max-batch "${MAX_BATCH:-16}" \
  --tree "${TREE:-auto}" --draft-vocab "${DRAFT_VOCAB:-auto}" --device cuda --out "$RES/throughput" \
  > "$RES/throughput.log" 2>&1
step done
