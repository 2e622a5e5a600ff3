"""Where a running batch's step goes (chimera/batch.py): the figures behind issue #17's GPU rows.

`chimera throughput` on an H100 gave 990 tokens/s in total at 64 clients (session 15), about 45 ms a step for 64
sequences, where one request alone steps in about 1.1 ms. This script separates what a plain step of R sequences
over a W-slot window costs: the whole ``RunningBatch.step`` (forward, argmax, the one read, each member's
detokenization and stop check), the captured forward alone, and the host's part (the rest); and how long
``RunningBatch.warm_up`` takes to capture every shape up to the largest R and W. Session 16 measured the
uncaptured-prefill, uncompiled batch on an H100 (docs/gpu/batch_step_cost_session16_h100.jsonl: 3.1 ms a step for
one row, 17 ms for 64 rows over 2,048 slots, 20 ms a join); ``--compile`` (on by default on a GPU in bfloat16)
measures the compiled step, over a W-slot window too (until session 20 it attended over every slot of the
largest W, whatever the prompts' lengths). Runs on a CPU
too (eager forwards, no captures). ``--draft-depth D`` measures, beside each plain step, the drafted step of a second
batch whose rows draft chains of D tokens with the shipped drafter (drafters/rows.py; every step drafts), and the
tokens it emitted a step (on these prompts, not a measure of tau).

    python scripts/batch_step_cost.py --rows 1 4 16 64 --windows 256 1024 2048 --out batch_step_cost.json
"""

import argparse
import json
import time

import torch

import chimera
from chimera.attention import CHAIN_ATTENTION
from chimera.batch import RunningBatch
from chimera import SpeculativeDecoder
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.drafters.chimera import ChimeraDrafter
from chimera.models import resolve_device, synchronize
from chimera.text import encode_prompt
from report_json import save_json


def mean_ms(fn, device: torch.device, repeats: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / repeats


def measure(batch: RunningBatch, rows: int, window: int, steps: int, request: list[int], filler: int) -> dict:
    """R sequences whose prompts (``request`` after filler tokens) put the step's window at W, then ``steps``
    timed steps of each kind; the mean time of a join (``add``: the prompt's prefill and first token) is timed too.
    A sequence that ends early leaves (``rows_at_end`` says how many stayed)."""
    prompt = [filler] * (window // 2 + 1 - len(request)) + request  # the first steps attend over W slots
    device = batch.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(rows):
        batch.add(prompt, max_new_tokens=4 * steps + 8)
    synchronize(device)
    add = 1000 * (time.perf_counter() - start) / rows  # a join: its prefill (eager) and first token

    def step():
        batch.step()
        for sequence in [s for s in batch.running if s.done]:
            batch.remove(sequence)

    def leave() -> int:
        """Every sequence out of the batch; how many had stayed."""
        stayed = list(batch.running)
        for sequence in stayed:
            batch.remove(sequence)
        return len(stayed)

    step()  # the shape met once (captured here if warm_up did not)
    active = list(batch.running)
    counts = batch.counts
    drafted, drafted_tokens = counts.drafted, counts.drafted_tokens
    whole = mean_ms(step, device, steps)
    attended = batch._window(max(s.length for s in active) + 1)  # the slots the steps attended over
    if batch.drafts is not None:  # the drafted step alone: its forward is the plain step's plus the drafting
        leave()
        per_step = (counts.drafted_tokens - drafted_tokens) / max(counts.drafted - drafted, 1)
        return {"rows": rows, "draft_depth": batch.draft_depth, "window": attended, "drafted_step_ms": round(whole, 3),
                "tokens_per_step": round(per_step, 2)}
    key, function, inputs = batch._idle_steps(batch._rows(rows), attended)[0]  # the captured plain step, idle rows
    forward = mean_ms(lambda: batch.runner.run(key, function, *inputs), device, steps)
    stayed = leave()
    return {"rows": rows, "rows_at_end": stayed, "window": attended, "prompt_tokens": len(prompt),
            "add_ms": round(add, 3), "step_ms": round(whole, 3),
            "forward_ms": round(forward, 3),
            "host_and_rest_ms": round(whole - forward, 3), "tokens_per_s": round(1000 * stayed / whole, 1)}


def profiled(run, device: torch.device):
    """``run()`` once untimed, then once under the profiler (each kernel seen: not replayed)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
        synchronize(device)
    return prof


def profile(batch: RunningBatch, rows: int, top: int = 15) -> dict:
    """One plain forward of ``rows`` rows over the whole row, run as it is (not replayed, so that the profiler sees
    each kernel; compiled where the batch is): the ``top`` kernels by device time, microseconds over all calls."""
    device = batch.device
    tokens, positions = batch._plain_inputs([], rows)
    prof = profiled(lambda: batch._plain_forward(batch._window(batch.capacity), tokens, positions), device)
    events = [e for e in prof.key_averages() if (e.device_time_total if device.type == "cuda" else e.cpu_time_total)]
    time_of = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    events.sort(key=time_of, reverse=True)
    return {"rows": rows, "kernels": [{"name": e.key[:120], "calls": e.count, "us": round(time_of(e), 1)}
                                      for e in events[:top]]}


def chain_parts(batch: RunningBatch, rows: int) -> dict:
    """The parts of a drafted step of ``rows`` rows at the batch's deepest depth, each run as it is (compiled where
    the batch is, not replayed): drafting the chains, the forward that verifies them, and the acceptance with the
    drafter's read of the verified tokens. Per part, the kernels launched and their device time in microseconds (on
    a CPU: the operators and their time); on a GPU the 8 costliest kernels of each part too (session 19 found the
    verification 80 % of a drafted step on an H200, 3.8 ms at 64 rows against 1.7 for a plain forward)."""
    device, depth = batch.device, batch.draft_depth
    window = batch._window(batch.capacity)
    tokens, lengths, drafted = batch._chain_inputs([], rows)
    chain = batch._draft_chains(window, depth, tokens, lengths)
    logits, final = batch._verify_chains(window, chain, lengths)
    parts = {"draft": lambda: batch._draft_chains(window, depth, tokens, lengths),
             "verify": lambda: batch._verify_chains(window, chain, lengths),
             "accept_and_read": lambda: batch._accept_chains(chain, logits, final, tokens, lengths, drafted)}
    out = {"rows": rows, "depth": depth}
    for name, run in parts.items():
        with torch.no_grad():
            prof = profiled(run, device)
        if device.type == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_name: dict[str, list[float]] = {}
            for e in kernels:
                by_name.setdefault(e.name[:100], []).append(e.device_time)
            costliest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:8]
            out[name] = {"kernels": len(kernels), "device_us": round(sum(e.device_time for e in kernels), 1),
                         "costliest": [{"name": k, "calls": len(t), "us": round(sum(t), 1)} for k, t in costliest]}
        else:
            ops = [e for e in prof.events() if e.name.startswith("aten::")  # outermost operators
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
            out[name] = {"operators": len(ops), "cpu_us": round(sum(e.cpu_time_total for e in ops), 1)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="the plain step through torch.compile; auto: on a GPU in bfloat16 or float16")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also profile one uncaptured plain forward of ROWS rows: its 15 costliest kernels; with "
                        "--draft-depth, the parts of a drafted step of each rows bucket too")
    p.add_argument("--draft-depth", type=int, default=0,
                   help="also time a batch drafting chains of this many tokens (the shipped drafter)")
    p.add_argument("--verify-graphs", choices=["shared", "per-depth"], default="shared",
                   help="the drafting batch's compiled forward that verifies its chains: one for every depth (shared) "
                        "or one a depth; in one process only the first is compiled (Dynamo reuses a shared graph for "
                        "any length), so compare them in two runs")
    p.add_argument("--chain-attention", choices=list(CHAIN_ATTENTION), default="grouped",
                   help="the drafting batch's attention of a chain: grouped SDPA, the query heads folded into "
                        "queries of their key head (attention.batch_attention_folded), or the query tokens read as "
                        "query heads (attention.batch_attention_heads)")
    p.add_argument("--random-weights", metavar="DIR",
                   help="a model of the config in DIR (config.json and a tokenizer) with random weights, and a drafter "
                        "of random weights (timings do not depend on the weights): no model to bring to the device")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    quiet_libraries()
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.random_weights)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights),
                                                 dtype=getattr(torch, dtype))
        model = model.to(device).eval().requires_grad_(False)
    else:
        model, tokenizer = chimera.load_base(args.model, dtype=dtype, device=str(device))
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and dtype != "float32")
    drafter = None
    if args.draft_depth and args.random_weights:  # the whole vocabulary: a random drafter has no token counts
        drafter = ChimeraDrafter.for_base(model, num_draft_heads=args.draft_depth).eval().requires_grad_(False)
        drafter.prepare_inference()
    elif args.draft_depth:  # as scripts/device/batch_drafting.sh's throughput runs, through the engine's model (on a
        # CPU the copy with the calibrated linear layers)
        decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="dynamic-64-8-3",
                                     draft_vocab=16384)
        model, drafter = decoder.verifier.model, decoder.drafter
    batch = RunningBatch(model, tokenizer, max_batch=max(args.rows), capacity=max(args.windows), compiled=compiled)
    filler = next(t for t in range(1, 1 << 20) if t not in batch.eos_ids)
    request = encode_prompt(tokenizer, "Write a long story about a lighthouse keeper and a storm.")  # a long answer
    batches = [batch]
    if drafter is not None:
        batches.append(RunningBatch(model, tokenizer, max_batch=max(args.rows), capacity=max(args.windows),
                                    compiled=compiled, drafter=drafter, draft_depth=args.draft_depth, adaptive=False,
                                    verify_graphs=args.verify_graphs, chain_attention=args.chain_attention))
    captured = 0.0
    for each in batches:
        each.add([filler] * 8, max_new_tokens=1)  # the KV memory is allocated by a first forward
        each.remove(each.running[0])
        captured += each.warm_up()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": dtype, "graphs": batch.runner.graphs,
              "verify_graphs": args.verify_graphs if drafter is not None else None,
              "chain_attention": args.chain_attention if drafter is not None else None,
              "compiled": batch.decoder.describe() if batch.decoder is not None else "no",
              "warm_up_s": round(captured, 2), "compile_s": round(batch.decoder.seconds, 1) if batch.decoder else 0.0,
              "shapes_captured": len(batch.runner.captured), "steps": []}
    if drafter is not None:  # the drafting batch's captured steps as its warm-up timed them (ms; 0: plain)
        report["warm_step_ms"] = {f"{rows}x{window}": {depth: round(1000 * s, 3) for depth, s in costs.items()}
                                  for (rows, window), costs in batches[1].warm_costs.items()}
    for window in args.windows:
        for rows in args.rows:
            row = measure(batch, rows, window, args.steps, request, filler)
            if args.draft_depth:
                row.update(measure(batches[1], rows, window, args.steps, request, filler))
            report["steps"].append(row)
            print(json.dumps(row), flush=True)
    if args.profile:
        report["profile"] = profile(batch, args.profile)
        print(json.dumps(report["profile"], indent=1))
        if drafter is not None:
            report["chain_parts"] = [chain_parts(batches[1], rows) for rows in sorted({batches[1]._rows(r)
                                                                                       for r in args.rows})]
            print("\n".join(json.dumps(parts) for parts in report["chain_parts"]))
    print(json.dumps({k: v for k, v in report.items() if k not in ("steps", "profile", "chain_parts")}))
    save_json(report, args.out)


if __name__ == "__main__":
    main()
