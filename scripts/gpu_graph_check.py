"""On a GPU: decoding through captured CUDA graphs (drafting and verification), of transformers' forward or of the
decoder compiled by torch.compile, gives the same tokens as eager decoding and as model.generate (float32), what each saves per step, and tau and speed by tree (static trees
by node count, dynamic ones as dynamic-N[-BEAM]).

``--attention-route``: every decoder's verifier attention (SpeculativeDecoder's attention_route), to check a candidate
route token for token before it is adopted.

Usage: python scripts/gpu_graph_check.py [--prompts 4] [--max-new-tokens 128] [--trees 64 dynamic-64]
       [--attention-route folded]
"""

import argparse
import json

import torch

import chimera
from chimera.attention import VERIFIER_ATTENTION
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short story about a lost key.",
           "What are the main causes of inflation?", "Give step-by-step instructions to bake bread.",
           "Summarise the plot of Romeo and Juliet.", "Write a Python function that reverses a list."]


def measure(decoder, prompts, max_new_tokens, references=None) -> dict:
    decoder.generate(PROMPTS[-1], max_new_tokens=16)  # warm-up (and the captures)
    tokens = steps = exact = 0
    seconds = 0.0
    split = {"draft": 0.0, "verify": 0.0, "other": 0.0}
    for i, prompt in enumerate(prompts):
        r = decoder.generate(prompt, max_new_tokens=max_new_tokens)
        exact += references is not None and r.token_ids == references[i]
        tokens += r.new_tokens
        steps += r.steps - 1
        seconds += r.seconds
        for key in split:
            split[key] += getattr(r, f"time_{key}")
    report = {"tau": round(tokens / (steps + len(prompts)), 3), "tokens_per_s": round(tokens / seconds, 1),
              "ms_per_step": {k: round(1000 * v / steps, 2) for k, v in split.items()},
              "tree": decoder.tree.topology.describe()}
    if references is not None:
        report["exact"] = f"{exact}/{len(prompts)}"
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--trees", nargs="*", default=["32", "64", "96", "dynamic-32", "dynamic-64", "dynamic-96"])
    p.add_argument("--attention-route", default="repeated", choices=list(VERIFIER_ATTENTION))
    args = p.parse_args()
    route = args.attention_route
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cuda")
    drafter = resolve_drafter("auto", model)
    prompts = PROMPTS[: args.prompts]
    references = []
    for prompt in prompts:
        ids = torch.tensor([chimera.SpeculativeDecoder(model, tokenizer).prepare(prompt)], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.max_new_tokens)
        references.append(out[0, ids.shape[1]:].tolist())
    for name, with_drafter, graphs, compiled in [
            ("ar-eager", False, False, False), ("ar-graph", False, True, False), ("ar-compiled", False, True, True),
            ("chimera-eager", True, False, False), ("chimera-graph", True, True, False),
            ("chimera-compiled", True, True, True)]:
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter if with_drafter else None,
                                             sync_timing=True, cuda_graphs=graphs, compile=compiled,
                                             calibrate=False, attention_route=route)  # each on the default tree
        print(name, json.dumps(measure(decoder, prompts, args.max_new_tokens, references)), flush=True)
    for tree in args.trees:
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=tree, attention_route=route)
        print(f"graph-tree-{tree}", json.dumps(measure(decoder, prompts, args.max_new_tokens, references)),
              flush=True)


if __name__ == "__main__":
    main()
