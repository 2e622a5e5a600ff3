#!/usr/bin/env bash
# On the device machine, after staging the model (.device/q1..q4, as compat_check.sh): the compiled fast path.
# 1. float32 exactness of compiled graphs against eager graphs and generate (gpu_graph_check.py);
# 2. `chimera bench` in bfloat16: hf-compiled, ar, chimera on LIMIT questions a category, 256 new tokens; hf on 1;
# 3. the step-cost probe on random-weight 1B and 8B Llama shapes (scripts/step_cost_probe.py);
# 4. `chimera bench` in float32 (hf, ar, chimera; 1 question a category): exactness against hf.
# Start it with setsid (it runs longer than one call); results and progress.txt in $HOME/res-compiled, which the
# polling call brings back: tar czf $OUT/res.tgz -C $HOME res-compiled
set -uo pipefail
RES=$HOME/res-compiled
mkdir -p "$RES"
export CHIMERA_CACHE=$HOME/cache PYTHONPATH=$HOME/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bash scripts/device/stage_model.sh
step() { echo "$(date +%T) $1" >> "$RES/progress.txt"; }
Q=$HOME/stage/spec_bench.jsonl
step check
python3 scripts/gpu_graph_check.py --prompts 4 --max-new-tokens 128 --trees dynamic-64 > "$RES/graph_check.txt" 2>&1
step bench-bf16
python3 -m chimera.cli bench --questions "$Q" --limit "${LIMIT:-8}" --max-new-tokens 256 \
  --methods hf-compiled ar chimera --device cuda --out "$RES/gpu_bench_bf16" > "$RES/gpu_bench_bf16.log" 2>&1
python3 -m chimera.cli bench --questions "$Q" --limit 1 --max-new-tokens 256 \
  --methods hf ar --device cuda --out "$RES/gpu_bench_bf16_hf" > "$RES/gpu_bench_bf16_hf.log" 2>&1
step probe
python3 scripts/step_cost_probe.py --shapes 1b 8b --out "$RES/step_cost_probe.json" > "$RES/probe.log" 2>&1
step bench-fp32
python3 -m chimera.cli bench --questions "$Q" --limit 1 --max-new-tokens 256 --dtype float32 \
  --methods hf ar chimera --device cuda --out "$RES/gpu_bench_fp32" > "$RES/gpu_bench_fp32.log" 2>&1
step done
