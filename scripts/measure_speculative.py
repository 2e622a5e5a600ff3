"""tau, tokens/s and the per-step time split of speculative vs plain decoding, same process, same prompts.

Usage: python scripts/measure_speculative.py [--device cpu] [--dtype float32] [--max-new-tokens 128]
       [--configs none:chain4 random:chain4 auto:chain4 auto:small auto:medium] [--train-steps 0]
       [--temperature 1.0 --top-k 0 --top-p 1.0 --seed 0]
A config is DRAFTER:TREE[:DRAFT_VOCAB] with DRAFTER one of none, random, auto (the shipped drafter) or a
directory, and DRAFT_VOCAB auto (the default), full or a token count.
With --temperature > 0 every config samples (lossless speculative sampling); prompt i uses seed + i, so runs
repeat exactly. Compare its tau with a greedy run (the default, --temperature 0) of the same configs.
"""

import argparse
import json
import time

import torch

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.sampling import SamplingConfig

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
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    SamplingConfig(**sampling)  # bad values fail here, before any loading
    hf_sampling = dict(do_sample=True, **sampling) if args.temperature > 0 else dict(do_sample=False)
    torch.manual_seed(0)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=args.device)
    prompts = PROMPTS[: args.prompts]
    rows = []
    if args.hf:
        dec = chimera.SpeculativeDecoder(model, tokenizer)
        tokens = seconds = 0
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([dec.prepare(prompt)], device=model.device)
            torch.manual_seed(args.seed + i)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 **hf_sampling)
            seconds += time.perf_counter() - t
            tokens += out.shape[1] - ids.shape[1]
        rows.append({"config": "hf-generate", "tokens_per_s": round(tokens / seconds, 2), "tau": 1.0})
        print(rows[-1], flush=True)
    for config in args.configs:
        spec, tree, vocab = (config.split(":") + ["auto"])[:3]
        drafter = resolve_drafter(spec, model)
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=tree, sync_timing=True,
                                             draft_vocab=vocab)
        decoder.generate(prompts[0], max_new_tokens=8, **sampling, seed=args.seed)  # warm-up
        results = [decoder.generate(prompt, max_new_tokens=args.max_new_tokens, **sampling, seed=args.seed + i)
                   for i, prompt in enumerate(prompts)]
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
        json.dump({"device": args.device, "dtype": args.dtype, "sampling": {**sampling, "seed": args.seed},
                   "rows": rows}, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
