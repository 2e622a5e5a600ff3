#!/usr/bin/env bash
# On the device machine, after staging the model (scripts/device/stage_parts.sh; .device/q1..q3 and q5..q7 copied to
# $HOME/stage, this call carrying .device/q4 and .device/train): issue #18's training changes, each measured alone
# against a control, all warm-started from the shipped drafter and trained side by side on one GPU on the same answers.
#   1. The base's greedy answers (bf16) to the training prompts of .device/train/prompts.jsonl.gz (the first lines of
#      ../shared/data/prompts/train.jsonl, written by scripts/device/stage_train_prompts.sh), and apart to its last
#      HELDOUT lines, which neither the shipped drafter nor these runs train on.
#   2. One `chimera train --init SHIPPED` a variant, in parallel, each STEPS steps with the shipped drafter's settings
#      (8 heads, batch 32, 64 chain roots a sample) and a window of WINDOW tokens (default 1280, the shipped drafter's
#      since session 24; round 2's was 512):
#        control   the same data and loss as the shipped drafter (what more training alone gives)
#        kl        --kl: the base's whole distribution instead of its argmax
#        features  --feature-layers FEATURE_LAYERS (default 2,15,27), grown from the shipped drafter with the new
#                  layers' fuse columns at zero (chimera.train.trainer.grown_fuse_weight)
#        sampled   the greedy answers and SAMPLED more sampled at TEMPERATURE to the first SAMPLED prompts
#        deeper    --depth DEEPER (default 10): heads past the eighth, grown as copies of it (docs/training.md, "Deeper
#                  drafts": untrained copies gave tau +1.6 % at 10 levels on the CPU)
#        long      --max-len LONG_LEN (default 1280) instead of WINDOW (the same as control unless WINDOW is set
#                  lower, as WINDOW=512 reproduces session 24): the window every sample is cut to, prompt first,
#                  holds the answers to long prompts too. At 512 (round 2's), 377 of the first 12,000 prompts
#                  leave no answer in it and no position past 511 is ever trained, while Spec-Bench's
#                  summarization and retrieval prompts are 683 and 770 tokens long (medians): those categories
#                  draft where the drafter never learnt to.
#      A variant may join changes with '+' (long+features+kl: all three in one run). VARIANTS picks some (default:
#      control kl features).
#   3. Each drafter and the shipped one scored on the unseen answers (scripts/acceptance_profile.py: top-1 agreement
#      by depth, in windows of each of PROFILE_LENS tokens, default "512 1280"), then tau of each on TAU_LIMIT
#      questions of every Spec-Bench category, or of TAU_CATEGORIES (float32, dynamic-64 tree over the whole
#      vocabulary; scripts/compare_trees.py), in parallel.
#   4. With BENCH=1, then alone: `chimera bench` in bf16 of hf-compiled, ar and chimera with the shipped drafter
#      (prepare.sh's bench_bf16, LIMIT questions a category, default 8; its first run calibrates the trees, about 5
#      minutes of compiling on a fresh machine). BENCH=first runs it before everything else instead (session 24's
#      bench, left to the end, ran out of device time), then the KV compaction's compile times on the card
#      (scripts/compaction_compiles.py).
# Session 22 (an H100, docs/training.md): `STEPS=1000 TAU_LIMIT=3 bash scripts/device/train_variants.sh`; control and
# features ran out of memory at their first evaluation beside kl (fixed since: chimera.train.trainer.evaluate) and were
# trained again by the same `chimera train` lines, control beside a second failing features run, then features alone;
# then tau of all four on 10 questions a category (this script's default since). Evaluation now takes a few GB, not 25:
# four runs side by side on an 80 GB card are expected to fit but have not been run.
# Session 24 (an H100): `VARIANTS="control long" STEPS=1000 bash scripts/device/train_variants.sh`, with round 2 as
# the shipped drafter and a window of 512 (now `WINDOW=512`): 14 minutes from distillation to tau, the two runs 258 s
# side by side (peak 15.5 GB at 1,280 tokens, 12.0 at 512). `long` became round 3, the shipped drafter.
# Start it with setsid; progress.txt and results in $HOME/res-variants (small ones packed into results.tar.gz, each
# drafter's weights split into 15 MB parts), copied to $OUT by each polling call.
RES=$HOME/res-variants
. scripts/device/prepare.sh
STEPS=${STEPS:-1000}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-50}
HELDOUT=${HELDOUT:-512}
FEATURE_LAYERS=${FEATURE_LAYERS:-2,15,27}
SAMPLED=${SAMPLED:-6000}
DEEPER=${DEEPER:-10}
TEMPERATURE=${TEMPERATURE:-0.8}
LONG_LEN=${LONG_LEN:-1280}
WINDOW=${WINDOW:-1280}
PROFILE_LENS=${PROFILE_LENS:-512 1280}
TAU_LIMIT=${TAU_LIMIT:-10}
TAU_CATEGORIES=${TAU_CATEGORIES:-mt_bench translation summarization qa math_reasoning rag}
VARIANTS=${VARIANTS:-control kl features}
SHIPPED=chimera/assets/drafters/smollm2-135m-instruct
RUN=$HOME/run-variants
mkdir -p "$RUN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RES/gpu.txt"
zcat .device/train/prompts.jsonl.gz > "$RUN/prompts.jsonl"
head -n -"$HELDOUT" "$RUN/prompts.jsonl" > "$RUN/train_prompts.jsonl"
tail -n "$HELDOUT" "$RUN/prompts.jsonl" > "$RUN/heldout_prompts.jsonl"
distill() {  # distill NAME PROMPTS [ARGS]: the base's answers, bf16, 256 new tokens
  local name=$1 prompts=$2; shift 2
  python3 -m chimera.cli distill --prompts "$prompts" --out "$RUN/$name" --max-new-tokens 256 --batch-size 768 \
    --dtype bfloat16 --device cuda "$@" > "$RES/distill_$name.log" 2>&1
}
bench_alone() {  # the shipped drafter's bf16 speed against hf-compiled (#16), its summary kept with the small results
  bench_bf16
  mkdir -p "$RES/small"; cp "$RES"/gpu_bench_bf16/{summary.json,report.md} "$RES/small/" 2>/dev/null
}
if [ "${BENCH:-}" = first ]; then
  bench_alone
  step compaction-compiles
  python3 scripts/compaction_compiles.py --model smollm2-135m-instruct --device cuda --dtype bfloat16 \
    > "$RES/small/compaction_compiles.txt" 2>&1
  tar -czf "$RES/results.tar.gz" -C "$RES" small gpu_bench_bf16
fi
step distill
distill data "$RUN/train_prompts.jsonl" &
distill heldout "$RUN/heldout_prompts.jsonl" &
if [[ " ${VARIANTS//+/ } " == *" sampled "* ]]; then
  head -n "$SAMPLED" "$RUN/train_prompts.jsonl" > "$RUN/sampled_prompts.jsonl"
  distill sampled "$RUN/sampled_prompts.jsonl" --temperature "$TEMPERATURE" --seed 1 &
fi
wait
step train
for variant in $VARIANTS; do
  extra=(); data=("$RUN/data"); depth=8; max_len=$WINDOW
  for change in ${variant//+/ }; do
    case $change in
      control) ;;
      kl) extra+=(--kl) ;;
      features) extra+=(--feature-layers "$FEATURE_LAYERS") ;;
      sampled) data+=("$RUN/sampled") ;;
      deeper) depth=$DEEPER ;;
      long) max_len=$LONG_LEN ;;
      *) step "unknown change $change in $variant"; continue 2 ;;
    esac
  done
  python3 -m chimera.cli train --data "${data[@]}" --out "$RUN/$variant" --steps "$STEPS" --batch-size 32 --max-len "$max_len" \
    --roots-per-seq 64 --depth "$depth" --lr "$LR" --warmup-steps "$WARMUP" --eval-every 250 --save-every 250 \
    --dtype bfloat16 --device cuda --export-dtype bfloat16 --init "$SHIPPED" "${extra[@]}" \
    > "$RES/train_$variant.log" 2>&1 &
done
wait
step profile
mkdir -p "$RES/small"
for variant in $VARIANTS shipped; do
  drafter=$RUN/$variant/drafter; [ "$variant" = shipped ] && drafter=$SHIPPED
  [ -d "$drafter" ] || { step "no drafter for $variant"; continue; }
  for len in $PROFILE_LENS; do  # the last window's profile goes into the copy of the drafter that the tau runs use
    out=(); [ "$len" = "${PROFILE_LENS##* }" ] && out=(--out "$RUN/profiled_$variant")
    python3 scripts/acceptance_profile.py --drafter "$drafter" --data "$RUN/heldout" "${out[@]}" --max-len "$len" \
      --dtype bfloat16 --device cuda > "$RES/small/heldout${len}_$variant.json" 2>> "$RES/profile_$variant.log"
  done
  [ "$variant" = shipped ] || cp "$RUN/$variant/log.jsonl" "$RES/small/log_$variant.jsonl"
done
step tau
for variant in $VARIANTS shipped; do
  [ -d "$RUN/profiled_$variant" ] || continue
  python3 scripts/compare_trees.py --questions "$HOME/stage/spec_bench.jsonl" --categories $TAU_CATEGORIES \
    --limit "$TAU_LIMIT" --max-new-tokens 256 --device cuda \
    --drafter "$RUN/profiled_$variant" --trees dynamic-64 --draft-vocab full --out "$RES/small/tau_$variant.json" \
    > "$RES/tau_$variant.log" 2>&1 &
done
wait
[ "${BENCH:-}" = 1 ] && bench_alone  # alone on the card by now
cp "$RES"/*.log "$RES/gpu.txt" "$RES/small/" 2>/dev/null
for variant in $VARIANTS; do
  [ -d "$RUN/profiled_$variant" ] || continue
  cp "$RUN/profiled_$variant/config.json" "$RES/small/config_$variant.json"
  mkdir -p "$RES/weights_$variant"
  split -b 15M "$RUN/profiled_$variant/model.safetensors" "$RES/weights_$variant/part."
  sha256sum "$RUN/profiled_$variant/model.safetensors" > "$RES/small/sha256_$variant.txt"
done
tar -czf "$RES/results.tar.gz" -C "$RES" small $(cd "$RES" && ls -d gpu_bench_bf16 2>/dev/null)
step done
