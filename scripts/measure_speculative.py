"""tau, tokens/s and the per-step time split of speculative vs plain decoding, same process, same prompts.

Usage: python scripts/measure_speculative.py [--device cpu] [--dtype float32] [--max-new-tokens 128]
       [--configs none:chain4 random:chain4 auto:chain4 auto:small auto:medium] [--train-steps 0]
A config is DRAFTER:TREE with DRAFTER one of none, random, auto (the shipped drafter) or a directory.
"""

import argparse
import json
import time

import torch

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter

PROMPTS = ["Explain why the sky is blue.", "Write a short poem about autumn.", "How do vaccines work?",
           "Give three tips for learning to code.", "What is the difference between a list and a tuple in Python?",
           "Describe the water cycle.", "Summarize the plot of Romeo and Juliet.", "What causes inflation?"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--configs", nargs="+", default=["none:chain4", "random:chain4", "auto:chain4", "auto:small",
                                                    "auto:medium"])
    p.add_argument("--hf", action="store_true", help="also time model.generate")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=args.device)
    prompts = PROMPTS[: args.prompts]
    rows = []
    if args.hf:
        dec = chimera.SpeculativeDecoder(model, tokenizer)
        tokens = seconds = 0
        for prompt in prompts:
            ids = torch.tensor([dec.prepare(prompt)], device=model.device)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens)
            seconds += time.perf_counter() - t
            tokens += out.shape[1] - ids.shape[1]
        rows.append({"config": "hf-generate", "tokens_per_s": round(tokens / seconds, 2), "tau": 1.0})
        print(rows[-1], flush=True)
    for config in args.configs:
        spec, tree = config.split(":")
        drafter = resolve_drafter(spec, model)
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=tree, sync_timing=True)
        decoder.generate(prompts[0], max_new_tokens=8)  # warm-up
        results = [decoder.generate(prompt, max_new_tokens=args.max_new_tokens) for prompt in prompts]
        tokens = sum(r.new_tokens for r in results)
        steps = sum(r.steps for r in results)
        seconds = sum(r.seconds for r in results)
        tree_steps = steps - len(results)
        split = {k: round(1000 * sum(getattr(r, "time_" + k) for r in results) / max(tree_steps, 1), 2)
                 for k in ("draft", "verify", "other")}
        rows.append({"config": config, "tokens": tokens, "tau": round(tokens / steps, 3),
                     "tokens_per_s": round(tokens / seconds, 2), "ms_per_step": split})
        print(rows[-1], flush=True)
    if args.out:
        json.dump({"device": args.device, "dtype": args.dtype, "rows": rows}, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
