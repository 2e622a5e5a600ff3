"""Each drafting variant measured alone on the real default model and its shipped drafter (GPU, bfloat16):
tokens/s, tau, ms per step, and r (a speculative step over a plain one, `ar` over the same attention route), on the
first turn of Spec-Bench questions, as the loop runs (nothing synchronised); then, synchronised at each stage (which
serialises what the loop overlaps), ms per step split draft / verify / other. Variants: steps launched before the
last is read or not, the dynamic tree's size and depth, the drafter's levels compiled by torch.compile (the default
with a compiled base) or op by op, the draft vocabulary (full, or the N tokens the base writes most), the verifier's
attention (SpeculativeDecoder's attention_route, "folded" by default here since session 28; `ar` is then also run
over each other route, before that route's variants). The base forward is compiled in all (the default in bfloat16).
``ar`` (no drafter) gives the plain step; ``--hf-compiled`` adds transformers' compiled generate on the same prompts.

    python scripts/drafting_variants.py --questions spec_bench.jsonl --limit 8 --out variants.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import chimera
from chimera.bench.methods import Decoding, HFGenerate, warm_up_static
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.text import encode_prompt
from chimera.tree import DynamicTree
from report_json import save_json

VARIANTS = {  # name: SpeculativeDecoder's options
    "default": {},
    "steps read before the next is launched": {"launch_ahead": False},
    "dynamic tree of 32 nodes": {"tree": DynamicTree(size=32, depth=8, beam=8)},
    "dynamic tree 6 deep": {"tree": DynamicTree(size=64, depth=6, beam=8)},
    "dynamic tree 5 deep, 32 nodes, beam 6": {"tree": DynamicTree(size=32, depth=5, beam=6)},
    "drafter's levels op by op": {"compile_drafter": False},
    "draft vocabulary of 16384 tokens": {"draft_vocab": 16384},
    "draft vocabulary of 8192 tokens": {"draft_vocab": 8192},
    "verifier steps grouped": {"attention_route": "grouped"},
    "verifier steps grouped, trees folded": {"attention_route": "folded"},
    "verifier attention repeated (transformers')": {"attention_route": "repeated"},
}
DEFAULT_VARIANTS = list(VARIANTS)[:6]  # draft vocabularies did not pay on the GPU in session 9 (docs/benchmarks.md)


def run(decoder, prompts: list[tuple[str, list[int]]], new_tokens: int) -> dict:
    """Decode every (category, prompt) as the loop runs, then again synchronised for the split; totals, tau by
    category, and the first call's time (it compiles)."""
    t0 = time.perf_counter()
    decoder.warm_up(max(len(p) for _, p in prompts), new_tokens)  # every capacity and prompt bucket, compiled
    warm = time.perf_counter() - t0
    decoder.sync_timing = False
    report = measure(decoder, prompts, new_tokens)
    decoder.sync_timing = decoder.device.type == "cuda"
    report["split_ms"] = measure(decoder, prompts, new_tokens)["split_ms"]
    report["first_call_s"] = round(warm, 1)
    return report


def measure(decoder, prompts: list[tuple[str, list[int]]], new_tokens: int) -> dict:
    tokens = steps = plain = 0
    seconds = draft = verify = other = 0.0
    by_group: dict[str, list[int]] = {}
    for group, prompt in prompts:
        r = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
        tokens += r.new_tokens
        steps += r.steps - 1
        plain += r.plain_steps
        seconds += r.seconds - r.time_prefill
        draft, verify, other = draft + r.time_draft, verify + r.time_verify, other + r.time_other
        counts = by_group.setdefault(group, [0, 0])
        counts[0] += r.new_tokens
        counts[1] += r.steps
    return {"tokens_per_s": round(tokens / seconds, 1), "tau": round(tokens / steps, 3),
            "ms_per_step": round(1000 * seconds / steps, 3), "plain_step_share": round(plain / steps, 3),
            "split_ms": {"draft": round(1000 * draft / steps, 3), "verify": round(1000 * verify / steps, 3),
                         "other": round(1000 * other / steps, 3)},
            "tau_by_category": {g: round(t / s, 3) for g, (t, s) in by_group.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--hf-compiled", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    quiet_libraries()
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16", device="cuda")
    questions = select(load_questions(args.questions), limit=args.limit)
    prompts = [(q.group, encode_prompt(tokenizer, q.turns[0])) for q in questions]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "questions": len(prompts),
              "new_tokens": args.new_tokens, "variants": {}}

    def save():
        save_json(report, args.out)

    ar = chimera.SpeculativeDecoder(model, tokenizer, None)
    plain = run(ar, prompts, args.new_tokens)
    report["ar"] = {**plain, "attention_route": ar.attention_route}
    print("ar", json.dumps(report["ar"]), flush=True)
    save()
    default_route = ar.attention_route
    del ar

    def route_of(name: str) -> str:
        return VARIANTS[name].get("attention_route", default_route)

    def variant(name: str, own_ar: dict) -> None:
        drafter = resolve_drafter("auto", model)
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, calibrate=False, **VARIANTS[name])
        row = run(decoder, prompts, args.new_tokens)
        row["r"] = round(row["ms_per_step"] / own_ar["ms_per_step"], 3)  # over `ar` on the same route
        row["draft_over_plain_step"] = round(row["split_ms"]["draft"] / own_ar["ms_per_step"], 3)
        row["speedup_over_ar"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
        report["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        save()
        del decoder, drafter
        torch.cuda.empty_cache()

    # the default route's variants first, each other route's after its own `ar`: session 28's only stall came where
    # a decoder followed one over another route in the same process (docs/benchmarks.md)
    for name in args.variants:
        if route_of(name) == default_route:
            variant(name, plain)
    for route in sorted({route_of(name) for name in args.variants} - {default_route}):
        # a variant of the verifier's attention changes the plain step too: `ar` over the same route beside it
        row = run(chimera.SpeculativeDecoder(model, tokenizer, None, attention_route=route), prompts, args.new_tokens)
        row["speedup_over_ar"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
        report[f"ar {route}"] = row
        print(f"ar {route}", json.dumps(row), flush=True)
        save()
        for name in args.variants:
            if route_of(name) == route:
                variant(name, row)
    if args.hf_compiled:
        method = HFGenerate(model, tokenizer, static=True, decoding=Decoding())
        warm_up_static(method, 16)
        tokens = seconds = 0
        for _, prompt in prompts:
            turn = method(prompt, args.new_tokens)
            tokens += len(turn.token_ids)
            seconds += turn.seconds
        report["hf_compiled"] = {"tokens_per_s": round(tokens / seconds, 1)}
        print("hf-compiled", json.dumps(report["hf_compiled"]), flush=True)
        save()


if __name__ == "__main__":
    main()
