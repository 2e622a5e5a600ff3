#!/usr/bin/env bash
# On the device machine, after another job of this session staged the model: `chimera throughput` in bfloat16, 4
# first turns a Spec-Bench category (24 requests), 128 new tokens, at 1, 4 and 16 clients, for `ar` and `chimera`
# through the engine's running batch (a request decoding alone drafts; the batch itself decodes plain unless
# --batch-drafting). Batched `generate` is left out: eager, it would take most of the call at one client.
# CONCURRENCY="4 16" runs only those. Results and progress.txt in $HOME/res-throughput.
RES=$HOME/res-throughput
. scripts/device/prepare.sh
step throughput
python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit 4 --concurrency ${CONCURRENCY:-1 4 16} \
  --max-new-tokens 128 --methods ar chimera --max-batch 16 --device cuda --out "$RES/throughput" \
  > "$RES/throughput.log" 2>&1
step done
