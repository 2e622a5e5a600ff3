"""tau of several draft trees on the same Spec-Bench questions (greedy), and whether their outputs agree.

tau is a property of the drafter and the tree, not of the device, so this runs anywhere; the first tree is
the reference that every other one's tokens must equal (greedy decoding is unique).

Usage: python scripts/compare_trees.py --questions spec_bench.jsonl [--categories mt_bench] [--limit 4]
       [--max-new-tokens 256] [--trees 64 dynamic-64] [--device cpu] [--draft-vocab full] [--out FILE]
"""

import argparse
import json
import time

import torch

import chimera
from chimera.bench.methods import OurDecoder
from chimera.bench.questions import load_questions, select
from chimera.bench.run import answer_question
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--questions", required=True)
    p.add_argument("--categories", nargs="+", default=["mt_bench"])
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--trees", nargs="+", default=["64", "dynamic-64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--drafter", default="auto")
    p.add_argument("--draft-vocab", default="auto", help="auto, full or a token count (as in chimera generate)")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=getattr(torch, args.dtype),
                                         device=args.device)
    drafter = resolve_drafter(args.drafter, model)
    questions = select(load_questions(args.questions), args.categories, args.limit)
    results, reference = {}, None
    for tree in args.trees:
        draft_vocab = args.draft_vocab if args.draft_vocab in ("auto", "full") else int(args.draft_vocab)
        # adaptive drafting off: a paused drafter would count plain steps into the tree's tau
        method = OurDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=draft_vocab, adaptive=False)
        method(tokenizer.encode("Hello"), 8)
        per_group, outputs, t0 = {}, [], time.perf_counter()
        for q in questions:
            for _, turn in answer_question(method, tokenizer, q, args.max_new_tokens):
                g = per_group.setdefault(q.group, [0, 0])
                g[0] += len(turn.token_ids)
                g[1] += turn.steps
                outputs.append(turn.token_ids)
        tokens, steps = sum(g[0] for g in per_group.values()), sum(g[1] for g in per_group.values())
        same = None if reference is None else outputs == reference
        reference = reference or outputs
        results[tree] = {"tree": method.tree.describe(), "tau": round(tokens / steps, 3),
                         "tau_per_group": {k: round(v[0] / v[1], 3) for k, v in per_group.items()},
                         "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1),
                         "same_tokens_as_first": same}
        print(json.dumps({tree: results[tree]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "questions": len(questions),
                       "max_new_tokens": args.max_new_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
