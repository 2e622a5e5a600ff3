"""tau (tokens per base forward) of a drafter on Spec-Bench questions, per category, greedy.

Usage: python scripts/eval_tau.py --drafter DIR --questions spec_bench.jsonl [--categories ...] [--limit N]
"""

import argparse
import json
from collections import defaultdict

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--drafter", default="auto")
    p.add_argument("--questions", required=True)
    p.add_argument("--categories", nargs="*")
    p.add_argument("--limit", type=int, default=None, help="questions per category")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tree", default="medium")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=args.device)
    decoder = chimera.SpeculativeDecoder(model, tokenizer, resolve_drafter(args.drafter, model), tree=args.tree)
    questions = [json.loads(line) for line in open(args.questions)]
    per_cat = defaultdict(list)
    for q in questions:
        if args.categories and q["category"] not in args.categories:
            continue
        if args.limit and len(per_cat[q["category"]]) >= args.limit:
            continue
        per_cat[q["category"]].append(q)
    summary = {}
    for cat, qs in per_cat.items():
        tokens = steps = 0
        for q in qs:
            messages = []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                r = decoder.generate(messages, max_new_tokens=args.max_new_tokens)
                messages.append({"role": "assistant", "content": r.text})
                tokens += r.new_tokens
                steps += r.steps
        summary[cat] = {"tau": round(tokens / steps, 3), "tokens": tokens, "questions": len(qs)}
        print(cat, summary[cat], flush=True)
    total_t = sum(v["tokens"] for v in summary.values())
    total_s = sum(v["tokens"] / v["tau"] for v in summary.values())
    summary["overall"] = {"tau": round(total_t / total_s, 3), "tokens": total_t}
    print("overall", summary["overall"])
    if args.out:
        json.dump(summary, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
