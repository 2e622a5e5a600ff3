# Sourced by the device scripts after they set RES (their results folder): the environment, the staged model
# (stage_model.sh), and step NAME, which appends a timestamped line to $RES/progress.txt for the polling calls.
# Poll back to back and copy results to $OUT as they come: a machine idle for 30 s between calls is handed back with
# everything on it (session 11 lost a bench's files and the variants' JSON that way).
set -uo pipefail
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=.:$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
step() { echo "$(date +%T) $1" >> "$RES/progress.txt"; }
# MODEL_LATER=1: the job is launched in the call that stages q7 (the pydantic wheels, the tokenizer) and its first runs
# need no weights (scripts/step_cost_probe.py --tokenizer); q1..q6 are staged while it runs, each call ending with
# `touch $HOME/stage/qN.done`, and model_staged waits for all six (up to 15 minutes) before joining them.
model_staged() {
  local i
  for i in $(seq 180); do ls "$HOME"/stage/q{1..6}.done > /dev/null 2>&1 && break; sleep 5; done
  bash scripts/device/stage_model.sh 2>> "$RES/progress.txt" || { step "staging failed: nothing more was run"; exit 1; }
  step model-staged
}
bash scripts/device/stage_model.sh ${MODEL_LATER:+deps-only} 2>> "$RES/progress.txt" ||
  { step "staging failed: nothing was run"; exit 1; }
# The two runs most device scripts start with: `chimera bench` in bfloat16 (hf-compiled, ar, chimera; $LIMIT questions
# a category, 256 new tokens; the tree `auto` unless BENCH_TREE and BENCH_VOCAB give one, which skips the calibration's
# ~6 min on a fresh machine) and the float32 graph check against generate (scripts/gpu_graph_check.py).
bench_bf16() {
  step bench-bf16
  python3 -m chimera.cli bench --questions "$HOME/stage/spec_bench.jsonl" --limit "${LIMIT:-8}" --max-new-tokens 256 \
    --methods hf-compiled ar chimera ${BENCH_TREE:+--tree "$BENCH_TREE"} ${BENCH_VOCAB:+--draft-vocab "$BENCH_VOCAB"} \
    --device cuda --out "$RES/gpu_bench_bf16" > "$RES/gpu_bench_bf16.log" 2>&1
}
# check_fp32 [ROUTE]: the verifier's attention route (default repeated, float32's own), its output in
# graph_check.txt, or graph_check_ROUTE.txt for another route; PROMPTS (default 4) and TREES (default dynamic-64).
check_fp32() {
  local route=${1:-repeated}
  step "check-fp32${1:+-$route}"
  python3 scripts/gpu_graph_check.py --prompts "${PROMPTS:-4}" --max-new-tokens 128 --trees ${TREES:-dynamic-64} \
    --attention-route "$route" > "$RES/graph_check${1:+_$route}.txt" 2>&1
}
# throughput_run: `chimera throughput`, `ar` and `chimera` with --batch-drafting (the batch drafts where its switch
# measures that it pays, per power-of-two size), a request alone drafting the tree the calibration chose on an H100 in
# session 15; CONCURRENCY (default 1 4 16 64) clients, THROUGHPUT_LIMIT questions a category (default 40), into
# $RES/throughput.
throughput_run() {
  step throughput
  python3 -m chimera.cli throughput --questions "$HOME/stage/spec_bench.jsonl" --limit "${THROUGHPUT_LIMIT:-40}" \
    --concurrency ${CONCURRENCY:-1 4 16 64} --max-new-tokens 128 --methods ar chimera --batch-drafting \
    --max-batch 64 --tree dynamic-64-8-3 --draft-vocab 16384 --device cuda --out "$RES/throughput" \
    > "$RES/throughput.log" 2>&1
}
# probe_8b "ROUTES" "TREES": the 8B shape's step-cost probe as the decoder runs by default (base forward and drafter's
# levels compiled), each verifier attention route of ROUTES with each tree of TREES, kernels listed, no hf-compiled.
probe_8b() {
  step probe-8b
  python3 scripts/step_cost_probe.py --shapes 8b --configs compiled_drafter --kernels --no-hf --attention $1 \
    --trees $2 ${MODEL_LATER:+--tokenizer "$HOME/stage/tokenizer"} --out "$RES/step_cost_probe_8b.json" \
    > "$RES/step_cost_probe_8b.log" 2>&1
}
