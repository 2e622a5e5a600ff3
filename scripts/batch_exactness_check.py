"""A running batch's sequences against the same prompts decoded alone, token for token, on the device at hand: plain
and drafting batches (chains for every row at once, drafters/rows.py), through CUDA graphs on a GPU and, in bfloat16
there, through the compiled step. In float32 every sequence must be what it is alone (what tests/test_batch.py
checks on this CPU); in bfloat16 a batch's forward of other shapes may round otherwise, and the share of identical
sequences is reported instead.

    python scripts/batch_exactness_check.py --prompts 8 --max-new-tokens 96 --dtype float32
"""

import argparse
import json

import torch

import chimera
from chimera import SpeculativeDecoder
from chimera.batch import RunningBatch
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.models import resolve_device
from chimera.text import encode_prompt
from report_json import save_json

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short story about a lost key.",
           "What are the main causes of inflation?", "Give step-by-step instructions to bake bread.",
           "Summarise the plot of Romeo and Juliet.", "Write a Python function that reverses a list.",
           "Name three colors and describe each.", "Count from one to twenty in words."]


def through_batch(batch: RunningBatch, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Every prompt through ``batch``, half of them joining once the first half has stepped a few times."""
    results, pending, order = {}, list(enumerate(prompts)), {}
    steps = 0
    while pending or batch.running:
        while pending and not batch.full and (steps >= 3 or len(batch.running) < len(prompts) // 2):
            index, prompt = pending.pop(0)
            sequence, _ = batch.add(prompt, max_new_tokens)
            order[id(sequence)] = index
        batch.step()
        steps += 1
        for sequence in [s for s in batch.running if s.done]:
            batch.remove(sequence)
            results[order[id(sequence)]] = sequence.result().token_ids
    return [results[i] for i in range(len(prompts))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--draft-depth", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    quiet_libraries()
    device = resolve_device(args.device)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=str(device))
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS[:args.prompts]]
    alone = SpeculativeDecoder(model, tokenizer, None, adaptive=False, calibrate=False)
    expected = [alone.generate(input_ids=prompt, max_new_tokens=args.max_new_tokens).token_ids for prompt in prompts]
    drafter = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="dynamic-64-8-3",
                                 draft_vocab=16384, calibrate=False).drafter
    compiled = device.type == "cuda" and args.dtype != "float32"
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "compiled": compiled, "batches": {}}
    capacity = max(map(len, prompts)) + args.max_new_tokens + args.draft_depth + 1
    for name, batch_drafter in (("plain", None), ("drafting", drafter)):
        batch = RunningBatch(model, tokenizer, max_batch=len(prompts), capacity=capacity, drafter=batch_drafter,
                             draft_depth=args.draft_depth, adaptive=False, compiled=compiled)
        got = through_batch(batch, prompts, args.max_new_tokens)
        same = sum(g == e for g, e in zip(got, expected))
        report["batches"][name] = {"identical": f"{same}/{len(prompts)}", "drafted_steps": batch.counts.drafted,
                                   "tau": round(batch.counts.tau, 3) if batch.counts.tau else None}
        print(name, json.dumps(report["batches"][name]), flush=True)
    save_json(report, args.out)


if __name__ == "__main__":
    main()
