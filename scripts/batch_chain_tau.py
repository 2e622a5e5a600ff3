"""tau of a drafting running batch (chimera/batch.py, chains drafted for every row at once by drafters/rows.py): the
tokens each sequence emits per drafted step, per chain depth and Spec-Bench category group, on the first turns that
`chimera throughput` replays. Every step drafts (the batch's switch off), so this is what a drafted step yields; a
step's cost is scripts/batch_step_cost.py's. Greedy: the tokens are those of plain decoding whatever the depth.

    python scripts/batch_chain_tau.py --questions spec_bench.jsonl --limit 11 --max-new-tokens 128 --depths 1 2 3
"""

import argparse
import json
from collections import defaultdict

import torch

import chimera
from chimera.batch import RunningBatch
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.models import resolve_device
from chimera.text import encode_prompt
from report_json import save_json


def batch_tau(batch: RunningBatch, prompts: list[tuple[str, list[int]]], max_new_tokens: int) -> dict:
    """Every prompt through ``batch`` (joining as rows free up); tokens and steps per category group."""
    pending, category_of, totals = list(prompts), {}, defaultdict(lambda: [0, 0])
    while pending or batch.running:
        while pending and not batch.full:
            category, prompt = pending.pop(0)
            sequence, _ = batch.add(prompt, max_new_tokens)
            category_of[id(sequence)] = category
        batch.step()
        for sequence in [s for s in batch.running if s.done]:
            batch.remove(sequence)
            result = sequence.result()
            totals[category_of[id(sequence)]][0] += result.new_tokens
            totals[category_of[id(sequence)]][1] += result.steps - 1  # the prefill's token is no step's
    out = {category: {"tau": round(tokens / steps, 3), "tokens": tokens}
           for category, (tokens, steps) in totals.items()}
    tokens, steps = map(sum, zip(*totals.values()))
    out["overall"] = {"tau": round(tokens / steps, 3), "tokens": tokens}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=11, help="questions per category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--draft-vocab", default="16384", help="as chimera throughput's --draft-vocab")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    quiet_libraries()
    device = resolve_device(args.device)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype=args.dtype, device=str(device))
    decoder = chimera.SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="dynamic-64-8-3",
                                         draft_vocab=args.draft_vocab)
    prompts = [(question.group, encode_prompt(tokenizer, question.turns[0]))  # chimera throughput's prompts
               for question in select(load_questions(args.questions), None, args.limit)]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "depths": {}}
    context = max(len(prompt) for _, prompt in prompts) + args.max_new_tokens + max(args.depths) + 1
    for depth in args.depths:
        batch = RunningBatch(decoder.verifier.model, tokenizer, args.max_batch, context, drafter=decoder.drafter,
                             draft_depth=depth, adaptive=False)
        report["depths"][depth] = batch_tau(batch, prompts, args.max_new_tokens)
        print(depth, json.dumps(report["depths"][depth]), flush=True)
    save_json(report, args.out)


if __name__ == "__main__":
    main()
