"""tau of the lone decoder per small static tree, drafting at every step (the adaptive switch off), on the first turns
that `chimera throughput` replays: what a running batch would gain by drafting a small tree a row instead of a chain.

Session 21 asked it before building trees into the batch (chimera/batch.py drafts a chain a row). A chain of depth d
is the tree of paths (0,), (0, 0), ...; the others branch at the first levels, where the shipped drafter's second
and third guesses are worth most. Greedy, float32: the tokens are those of plain decoding whatever the tree; only
the tokens per step (tau, the prefill's token left out) change.

    python scripts/static_tree_tau.py --questions spec_bench.jsonl --limit 3 --max-new-tokens 96 --out tau.json

``--prompts-out`` writes the same first turns for ``chimera distill`` instead, so that the drafter's acceptance profile
can be measured on the base's answers to them (scripts/acceptance_profile.py).
"""

import argparse
import json
import time

import torch

import chimera
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.models import resolve_device
from chimera.text import encode_prompt
from chimera.tree import TreeTopology
from report_json import save_json

TREES = {  # rank paths below the root (TreeTopology.from_paths)
    "chain-1": [(0,)],
    "chain-2": [(0,), (0, 0)],
    "chain-3": [(0,), (0, 0), (0, 0, 0)],
    "chain-5": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)],
    "top-2": [(0,), (1,)],
    "top-3": [(0,), (1,), (2,)],
    "top-2, chain-3": [(0,), (1,), (0, 0), (0, 0, 0)],
    "top-2, chain-3 and 1": [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)],
    "top-3, chain-3 and 1": [(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)],
    "top-3, 2 x top-2, chain-4": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=3, help="questions per category")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--draft-vocab", default="16384", help="as chimera throughput's --draft-vocab")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    p.add_argument("--prompts-out", default=None,
                   help="also write these first turns as `chimera distill --prompts` reads them, and stop")
    args = p.parse_args()
    quiet_libraries()
    questions = select(load_questions(args.questions), None, args.limit)
    if args.prompts_out:  # the same prompts, for the drafter's acceptance profile on them (docs/benchmarks.md)
        with open(args.prompts_out, "w") as f:
            f.writelines(json.dumps({"prompt": question.turns[0]}) + "\n" for question in questions)
        return
    device = resolve_device(args.device)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=str(device))
    drafter = resolve_drafter("auto", model)
    prompts = [encode_prompt(tokenizer, question.turns[0]) for question in questions]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "trees": {}}
    for name, paths in TREES.items():
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=TreeTopology.from_paths(paths),
                                             adaptive=False, calibrate=False, draft_vocab=args.draft_vocab)
        tokens = steps = 0
        start = time.perf_counter()
        for prompt in prompts:
            result = decoder.generate(input_ids=prompt, max_new_tokens=args.max_new_tokens)
            tokens, steps = tokens + result.new_tokens, steps + result.steps - 1  # the prefill's token is no step's
        report["trees"][name] = {"nodes": len(paths) + 1, "tau": round(tokens / steps, 3),
                                 "seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps(report["trees"][name]), flush=True)
    save_json(report, args.out)


if __name__ == "__main__":
    main()
