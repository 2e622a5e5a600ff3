"""What a GPU decoding step costs the host and the device, measured without a profiler (whose tracing of every
graph node inflates graph launches; session 11's profile put ``cudaGraphLaunch`` at 0.82 ms of host time).

Prints and writes as JSON:
1. ``synthetic``: the host time of one ``CUDAGraph.replay()`` on an idle device and the device's time per replay,
   for graphs of 1 to 1000 tiny kernels: whether a launch costs the host per kernel;
2. ``graphs``: the same for each graph the decoder captured (the base's score, the compaction, the drafting, the
   drafter's advance), with its number of kernels (counted by torch.profiler over one replay);
3. ``acceptance``: the host time of greedy acceptance of a 64-node tree (eager tensor ops), device idle;
4. ``loop``: tokens/s, ms a step and the loop's host split (launching draft / the rest of the launch / other)
   of greedy turns, unsynchronised, launched ahead, for ``ar`` and ``chimera`` (adaptive drafting off), the
   latter also in the ``VARIANTS`` of drafting (session 12 had the drafter's levels op by op against compiled;
   session 13 the choice of candidates compiled or not, and a shallower tree; session 14 also the base's attention
   with each group's query heads folded into one query, a variant since removed: docs/benchmarks.md).

    python scripts/step_anatomy.py --questions spec_bench.jsonl --out anatomy.json
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import chimera
from chimera.acceptance import greedy_accept
from chimera.bench.questions import load_questions, select
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.graph_runner import capture_graph
from chimera.text import encode_prompt
from chimera.tree import DynamicTree
from report_json import save_json


EIGHT_DEEP = {"tree": DynamicTree(size=64, depth=8, beam=8)}  # the GPU's "auto" tree when session 13 measured
VARIANTS = [  # name, with the drafter, SpeculativeDecoder's options, the parts of drafting compiled (None: its default)
    ("ar", False, {}, None),
    ("chimera", True, {}, None),  # the automatic tree: 64 nodes, 6 deep on a GPU since session 13
    ("chimera, 8 deep", True, EIGHT_DEEP, None),
    ("chimera, 8 deep, selection op by op", True, EIGHT_DEEP, ("inputs", "output")),  # session 13's variants
]


def launch_costs(replay, repeats: int = 30) -> dict:
    """Median host time of ``replay()`` with the device idle, and median device time per replay (events)."""
    host, device = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        replay()
        host.append(time.perf_counter() - start)
        end.record()
        end.synchronize()
        device.append(begin.elapsed_time(end) / 1000)
    return {"host_ms": 1000 * statistics.median(host), "device_ms": 1000 * statistics.median(device)}


def kernels_in(replay, top: int = 8) -> tuple[int, list]:
    """The number of kernels one replay runs, and the ``top`` kernel names by their summed device time (ms)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name[:90]][0] += 1
        by_name[e.name[:90]][1] += e.device_time_total / 1000
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return len(kernels), [{"kernel": name, "count": n, "ms": round(ms, 4)} for name, (n, ms) in ranked]


def synthetic() -> list[dict]:
    rows = []
    x = torch.zeros(16, device="cuda")
    for n in (1, 10, 100, 300, 1000):
        graph, _ = capture_graph(lambda: [x.add_(1) for _ in range(n)], warmup=1)
        rows.append({"kernels": n, **launch_costs(graph.replay)})
        print(f"synthetic {n:5d} kernels: {rows[-1]}", flush=True)
    return rows


def safe_to_replay(key, static) -> bool:
    """Zero the counts a compaction adds to a length, so repeated replays leave lengths in place. Prefills are left
    out: their graph reads the prompt's length, which the banks no longer hold."""
    if key[0] == "keep counted":
        static[1].zero_()
    return key[0] != "prefill"


def captured_graphs(decoder) -> list[dict]:
    rows = []
    runners = [("verifier", decoder.verifier.runner)]
    for bank in decoder.verifier.banks.values():
        bank.set_length(0)  # every tree and compaction then stays inside the bank's slots
    if hasattr(decoder.drafter, "runner"):
        runners.append(("drafter", decoder.drafter.runner))
        if decoder.drafter.count is not None:
            decoder.drafter.count.fill_(1)  # its advance reads the path's last entry: a length of 0 has none
    for owner, runner in runners:
        for key, (graph, static, _) in runner.captured.items():
            key = key if isinstance(key, tuple) else (key,)  # the drafter's advance is keyed by its name alone
            if not safe_to_replay(key, static):
                continue
            name = f"{owner} {key[0]}"
            shape = [str(getattr(k, "size", k)) for k in key[1:]]
            count, top = kernels_in(graph.replay)
            row = {"graph": name, "shape": " ".join(shape), "kernels": count, **launch_costs(graph.replay), "top": top}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "top"}, flush=True)
            for entry in top if key[0] in ("score", "propose") else ():
                print("    ", entry, flush=True)
    return rows


def acceptance_cost(decoder, repeats: int = 50) -> dict:
    tree = decoder.tree
    n = tree.topology.size
    logits = torch.randn(n, decoder.model.config.vocab_size, device="cuda", dtype=decoder.model.dtype)
    tokens = torch.randint(0, 100, (n,), device="cuda")
    host = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        greedy_accept(tokens, logits, tree)
        host.append(time.perf_counter() - start)
    return {"nodes": n, "host_ms": 1000 * statistics.median(host)}


def loop(decoder, prompts, new_tokens: int) -> dict:
    totals = dict(tokens=0, steps=0, seconds=0.0, draft=0.0, verify=0.0, other=0.0)
    for prompt in prompts:
        torch.cuda.synchronize()
        r = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
        totals["tokens"] += r.new_tokens
        totals["steps"] += r.steps - 1
        totals["seconds"] += r.seconds - r.time_prefill
        totals["draft"] += r.time_draft
        totals["verify"] += r.time_verify
        totals["other"] += r.time_other
    steps = totals["steps"]
    return {"tokens_per_s": totals["tokens"] / totals["seconds"], "tau": totals["tokens"] / steps,
            "ms_a_step": 1000 * totals["seconds"] / steps,
            "host_ms_a_step": {k: 1000 * totals[k] / steps for k in ("draft", "verify", "other")}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=1, help="questions per category")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="*", help="names of VARIANTS to run (default: all)")
    args = p.parse_args()
    variants = [v for v in VARIANTS if v[0] in args.variants] if args.variants else VARIANTS
    quiet_libraries()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "synthetic": synthetic()}
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16", device="cuda")
    prompts = [encode_prompt(tokenizer, q.turns[0]) for q in select(load_questions(args.questions), limit=args.limit)]
    drafter = resolve_drafter("auto", model)
    report["loop"] = {}
    for name, use_drafter, options, parts in variants:
        chosen = drafter if use_drafter else None
        decoder = chimera.SpeculativeDecoder(model, tokenizer, chosen, adaptive=False, calibrate=False, **options)
        if parts is not None:  # only these parts of drafting compiled (before the first capture, which compiles)
            decoder.drafter.levels = drafter.compiled_levels(parts=parts)
        decoder.warm_up(max(len(x) for x in prompts), args.new_tokens)
        report["loop"][name] = loop(decoder, prompts, args.new_tokens)
        print(name, report["loop"][name], flush=True)
        report[f"graphs_{name}"] = captured_graphs(decoder)
        if chosen is not None and "acceptance" not in report:
            report["acceptance"] = acceptance_cost(decoder)
            print(report["acceptance"], flush=True)
        save_json(report, args.out)


if __name__ == "__main__":
    main()
