"""Where a benchmark turn's time goes in our loop, question by question (GPU, bfloat16, the default model).

`chimera bench` quotes Spec-Bench's speed (the mean over turns of tokens / seconds), which charges every
turn's fixed costs (prefill, first captures, pauses of Python's garbage collector) to short answers heavily. This
script decodes the first turn of Spec-Bench questions with ``ar`` and ``chimera`` as the bench does, after a
warm-up over every prompt (so each slot-cache capacity is captured before timing), and records per turn: the
prompt's length, new tokens, steps, wall time, the prefill, the garbage collector's pauses, and the time split
(synchronised, in a second pass). Then the same with ``gc.freeze()`` after the warm-up. For ``ar`` it also times
steps queued back to back with no read in between: what a step costs when the host never makes the GPU wait.

    python scripts/decode_profile.py --questions spec_bench.jsonl --limit 8 --out profile.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

import chimera
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.text import encode_prompt
from report_json import save_json

PAUSES: list[float] = []
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
_gc_start = [0.0]


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        PAUSES.append(time.perf_counter() - _gc_start[0])


def turn(decoder, prompt: list[int], new_tokens: int) -> dict:
    """One timed turn, synchronised around as the bench times it."""
    PAUSES.clear()
    sync()
    t0 = time.perf_counter()
    r = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
    sync()
    wall = time.perf_counter() - t0
    return {"prompt": len(prompt), "new": r.new_tokens, "steps": r.steps, "wall_ms": round(1000 * wall, 2),
            "prefill_ms": round(1000 * r.time_prefill, 2), "gc_ms": round(1000 * sum(PAUSES), 2),
            "gc_passes": len(PAUSES), "split_ms": {k: round(1000 * getattr(r, f"time_{k}"), 2)
                                                   for k in ("draft", "verify", "other")}}


def summary(rows: list[dict]) -> dict:
    per_turn = [r["new"] / (r["wall_ms"] / 1000) for r in rows]
    steps = sum(r["steps"] - 1 for r in rows)
    decode = sum(r["wall_ms"] - r["prefill_ms"] for r in rows)
    return {"spec_bench_tokens_per_s": round(statistics.mean(per_turn), 1),
            "total_tokens_per_s": round(1000 * sum(r["new"] for r in rows) / sum(r["wall_ms"] for r in rows), 1),
            "ms_per_step_after_prefill": round(decode / steps, 3),
            "prefill_ms_mean": round(statistics.mean(r["prefill_ms"] for r in rows), 2),
            "gc_ms_total": round(sum(r["gc_ms"] for r in rows), 1),
            "tau": round(sum(r["new"] for r in rows) / sum(r["steps"] for r in rows), 3)}


def back_to_back(decoder, prompt: list[int], steps: int) -> float:
    """ms per plain step when steps are queued with no read from the device in between (greedy argmax, KV kept
    by the session as the loop keeps it): the GPU's own cost of a step."""
    session = decoder.verifier.start(capacity=len(prompt) + steps + 1)
    tree = decoder.root_only
    out = session.prefill(torch.tensor(prompt, device=decoder.device))
    root = out.logits[-1].argmax(-1, keepdim=True)
    path = torch.zeros(1, dtype=torch.long, device=decoder.device)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = session.score(root, tree)
        root = out.logits[-1].argmax(-1, keepdim=True)
        session.keep(path, 1, tree)
    sync()
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    quiet_libraries()
    gc.callbacks.append(_gc_callback)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16" if DEVICE == "cuda" else "float32",
                                        device=DEVICE)
    questions = select(load_questions(args.questions), limit=args.limit)
    prompts = [encode_prompt(tokenizer, q.turns[0]) for q in questions]
    groups = [q.group for q in questions]
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "turns": len(prompts),
              "new_tokens": args.new_tokens, "methods": {}}
    for name in ("ar", "chimera"):
        drafter = resolve_drafter("auto", model) if name == "chimera" else None
        decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter)
        t0 = time.perf_counter()
        for prompt in prompts:  # every capacity and window captured (and compiled) before timing
            decoder.generate(input_ids=prompt, max_new_tokens=8)
        entry = {"warm_up_s": round(time.perf_counter() - t0, 1)}
        rows = [dict(turn(decoder, prompt, args.new_tokens), group=g) for prompt, g in zip(prompts, groups)]
        entry["as_bench"] = summary(rows)
        entry["turns"] = rows
        decoder.sync_timing = DEVICE == "cuda"
        timed = [turn(decoder, prompt, args.new_tokens) for prompt in prompts]
        entry["synchronised"] = summary(timed)
        entry["synchronised_split_ms_per_step"] = {
            k: round(sum(r["split_ms"][k] for r in timed) / sum(r["steps"] - 1 for r in timed), 3)
            for k in ("draft", "verify", "other")}
        decoder.sync_timing = False
        gc.freeze()
        frozen = [turn(decoder, prompt, args.new_tokens) for prompt in prompts]
        gc.unfreeze()
        entry["gc_frozen"] = summary(frozen)
        if name == "ar":
            entry["back_to_back_ms_per_step"] = round(back_to_back(decoder, prompts[0], args.new_tokens), 3)
        report["methods"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "turns"}), flush=True)
        save_json(report, args.out)
        del decoder, drafter
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
