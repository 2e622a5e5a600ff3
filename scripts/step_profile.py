"""Where a GPU decoding step's host time goes: torch.profiler over a few greedy turns of the default model (bf16,
compiled base forward, the shipped drafter), with steps launched ahead of the last one's read and without. Prints,
per variant, tokens/s as the loop runs and the profiler's table of host-side operators (synchronisations, item
reads, launches), sorted by their own host time.

    python scripts/step_profile.py --questions spec_bench.jsonl --limit 1 --out profile.txt
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import chimera
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.text import encode_prompt


def synchronisations(decoder, prompt: list[int]) -> str:
    """Where a short greedy turn makes the host wait for the device (torch.cuda's sync debug mode): each place
    in our code, with its count."""
    places = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                 if "/chimera/" in f.filename]
        places[" < ".join(reversed(stack[-3:]))] += 1

    shown = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        decoder.generate(input_ids=prompt, max_new_tokens=32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    return "synchronisations in a 32-token turn:\n" + "\n".join(f"{n:5d}  {place}" for place, n in places.most_common())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16", device="cuda")
    prompts = [encode_prompt(tokenizer, q.turns[0]) for q in select(load_questions(args.questions), limit=args.limit)]
    drafter = resolve_drafter("auto", model)
    lines = []
    for name, options in (("launched ahead", {}), ("read before the next launch", {"launch_ahead": False})):
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, adaptive=False, calibrate=False, **options)
        decoder.warm_up(max(len(x) for x in prompts), args.new_tokens)
        tokens, seconds, steps = 0, 0.0, 0
        for prompt in prompts:
            torch.cuda.synchronize()
            start = time.perf_counter()
            r = decoder.generate(input_ids=prompt, max_new_tokens=args.new_tokens)
            torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            tokens += r.new_tokens
            steps += r.steps - 1
        lines.append(f"## {name}: {tokens / seconds:.1f} tokens/s, {1000 * seconds / steps:.3f} ms a step, "
                     f"tau {tokens / steps:.2f}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for prompt in prompts[:2]:
                decoder.generate(input_ids=prompt, max_new_tokens=args.new_tokens)
            torch.cuda.synchronize()
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        lines.append(synchronisations(decoder, prompts[0]))
        print(lines[-2], flush=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
