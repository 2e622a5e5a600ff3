"""On a GPU: drafting through the captured CUDA graph gives the same tokens as eager drafting and as
model.generate (float32), and how much it saves per step.

Usage: python scripts/gpu_graph_check.py [--prompts 4] [--max-new-tokens 128] [--tree auto]
"""

import argparse
import json

import torch

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short story about a lost key.",
           "What are the main causes of inflation?", "Give step-by-step instructions to bake bread.",
           "Summarise the plot of Romeo and Juliet.", "Write a Python function that reverses a list."]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="auto")
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cuda")
    drafter = resolve_drafter("auto", model)
    report = {}
    for name, graphs in [("eager", False), ("graph", True)]:
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=args.tree, sync_timing=True,
                                             cuda_graphs=graphs)
        decoder.generate(PROMPTS[0], max_new_tokens=16)  # warm-up (and the capture)
        tokens = steps = 0
        split = {"draft": 0.0, "verify": 0.0, "other": 0.0}
        exact = 0
        for prompt in PROMPTS[: args.prompts]:
            r = decoder.generate(prompt, max_new_tokens=args.max_new_tokens)
            ids = torch.tensor([decoder.prepare(prompt)], device="cuda")
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens)[0, ids.shape[1]:].tolist()
            exact += r.token_ids == ref
            tokens += r.new_tokens
            steps += r.steps - 1
            split["draft"] += r.time_draft
            split["verify"] += r.time_verify
            split["other"] += r.time_other
        report[name] = {"exact": f"{exact}/{args.prompts}", "tau": round(tokens / (steps + args.prompts), 3),
                        "ms_per_step": {k: round(1000 * v / steps, 2) for k, v in split.items()},
                        "tree": decoder.tree.topology.describe()}
        print(name, json.dumps(report[name]), flush=True)


if __name__ == "__main__":
    main()
