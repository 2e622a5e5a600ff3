"""Plain decoding, speculation that always drafts, and adaptive speculation (adaptive.py), prompt by prompt: what
the switch saves where the drafter misses and what it costs where it hits; adaptive speculation twice, carrying the
last trial's verdict from prompt to prompt (the decoder's ``PauseMemory``, the default) and starting each prompt
afresh. Every output is checked identical. ``--drafter untrained``: a drafter of random weights, which misses
everywhere (the case where speculation must cost as little as it can).

Usage: python scripts/adaptive_prompts.py [--max-new-tokens 128] [--device cpu] [--drafter untrained]
       [--out docs/adaptive_prompts.json]
"""

import argparse
import json
import platform

import chimera
from chimera.adaptive import PauseMemory
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.drafters.chimera import ChimeraDrafter
from chimera.generate import SpeculativeDecoder

PROMPTS = ["Explain in three sentences why the sky is blue.",
           "Write a short story about a robot who learns to paint.",
           "Give step-by-step instructions to bake bread.",
           "What are the main causes of inflation?",
           "Write a Python function that checks whether a string is a palindrome, and explain it.",
           "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
           "and must-see attractions."]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--drafter", choices=("shipped", "untrained"), default="shipped")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=args.device)
    drafter = resolve_drafter("auto", model) if args.drafter == "shipped" else ChimeraDrafter.for_base(model, seed=0)
    tree = "auto" if args.drafter == "shipped" else "small"  # an untrained drafter has no profile to size a tree from
    decoders = {"plain": SpeculativeDecoder(model, tokenizer, None),
                "always": SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False),
                "adaptive": SpeculativeDecoder(model, tokenizer, drafter, tree=tree),
                "adaptive, each prompt afresh": SpeculativeDecoder(model, tokenizer, drafter, tree=tree)}
    for decoder in decoders.values():
        decoder.generate(PROMPTS[0], max_new_tokens=8)  # warm-up
    rows = []
    for prompt in PROMPTS:
        decoders["adaptive, each prompt afresh"].pauses = PauseMemory()  # session 11's switch: no verdict carried
        results = {name: d.generate(prompt, max_new_tokens=args.max_new_tokens) for name, d in decoders.items()}
        assert len({tuple(r.token_ids) for r in results.values()}) == 1, prompt
        row = {"prompt": prompt, **{name: {"tokens_per_s": round(r.tokens_per_s, 1), "tau": round(r.tau, 2),
                                           "plain_steps": r.plain_steps, "steps": r.steps}
                                    for name, r in results.items()},
               "break_even": round(decoders["adaptive"].costs.break_even or 0, 2)}
        rows.append(row)
        print(f"{prompt[:40]:40} plain {row['plain']['tokens_per_s']:5.1f}"
              f" | always {row['always']['tokens_per_s']:5.1f}"
              f" tau {row['always']['tau']:.2f} | adaptive {row['adaptive']['tokens_per_s']:5.1f}"
              f" tau {row['adaptive']['tau']:.2f}, sat out {row['adaptive']['plain_steps']}"
              f"/{row['adaptive']['steps'] - 1} | afresh {row['adaptive, each prompt afresh']['tokens_per_s']:5.1f}"
              f" sat out {row['adaptive, each prompt afresh']['plain_steps']} | r {row['break_even']:.2f}", flush=True)
    totals = {name: sum(r[name]["tokens_per_s"] for r in rows) / len(rows) for name in decoders}
    print("mean tokens/s: " + ", ".join(f"{name} {value:.1f}" for name, value in totals.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "device": args.device,
                       "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "drafter": args.drafter,
                       "mean_tokens_per_s": totals, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
