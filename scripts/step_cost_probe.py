"""What one decoding step costs on realistic sizes, against the memory-bandwidth floor (GPU, bfloat16).

Builds random-weight Llama shapes (timings do not depend on the weights; the vocabulary is the default model's,
49,152 tokens, so its tokenizer serves) and reports per shape: the bandwidth floor of one forward (weight bytes
over the GPU's rated bandwidth, and over the bandwidth a device copy reaches here), our plain step (ms and % of
the rated bandwidth) with the decoder compiled and without, ``hf-compiled``'s time per token, and for each tree
asked for the speculative step split (draft / verify / other), r and the speedup a drafter of a given tau would give
(tau / r). The drafter is random: it measures cost, not acceptance (it drafts every step: adaptive drafting off).

Two clocks, both kept: ``loop_ms`` is a step as decoding runs (steps launched ahead of the last one's read, no
synchronisation), from the difference of a short and a long turn so that the prompt's reading drops out; ``split``
is the loop's own timing with a synchronisation after each part (``sync_timing``), which adds a wait a part. r and
the bandwidth share come from ``loop_ms``. ``replay_ms``: each scoring and drafting graph replayed alone (since
session 27), so that ``replayed_over_plain`` gives a tree's verifying forward, and its drafting, over a plain
forward without acceptance, compaction or host work. (Until session 26 the probe reported the synchronised step
only: 5.26 ms for the 8B shape on an H200 in session 10.)

``--kernels``: where a compiled plain step's device time goes (and each tree's, drafting included), by kind of
kernel (cuBLAS's matrix products, attention, inductor's fused kernels, the rest) and the costliest kernels by name,
counted and timed by torch.profiler, the base's compiled forward run without a CUDA graph (the drafter's graphs'
kernels are listed one by one as well, and under "drafting" by themselves: its widest proposal and its advance, each
replayed alone); against ``loop_ms``, the rest is time between kernels. Inductor writes a
one-token step's matrix-vector products as Triton reductions fused with the norm or activation around them, so on
the GPU most of the products count as "fused": the names tell them apart (``mm`` in them). Measured on an H100
(session 26, 8B shape): 407 kernels and 5.80 ms of device time in a 5.89 ms plain step, the products at 85 % of the
rated bandwidth, attention 0.49 ms of which 0.20 ms copies of the keys and values per query head
(docs/benchmarks.md).

``--attention``: the verifier's attention routes to time, each its own plain step and trees (verifier.SlotVerifier's
``attention_route``). On an H100 (session 27, 8B shape, one process) one-token steps through SDPA's grouped kernel
("grouped") took 6.10 ms against 6.34 with transformers' repeated keys, but that process's compiled matrix-vector
kernels were slower than two others' (5.53 ms a step against 5.11-5.20: inductor's coordinate-descent tuning times
launch settings at each compilation), so only the attention kernels of each route, listed with ``--kernels``, compare
the routes cleanly. On an H200 (session 28, 8B shape, one process) "folded" took 4.95 ms a plain step against 5.23 and
6.11 ms to verify a 64-node tree against 6.34: the decoder's route with a compiled forward since (the default here).
The ``135m`` shape is the default model's, to weigh a route for it too.

Usage (on the GPU machine):
    python scripts/step_cost_probe.py --shapes 8b --configs compiled_drafter --trees dynamic-64-8-8:full \
        dynamic-32-8-3:16384 --attention repeated folded --kernels --no-hf --out docs/gpu/step_cost_probe_8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch._inductor.config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import chimera
from chimera.bench.methods import Decoding, HFGenerate, warm_up_static
from chimera.cli import quiet_libraries
from chimera.models import synchronize
from chimera.drafters.chimera import ChimeraDrafter
from chimera.attention import VERIFIER_ATTENTION
from chimera.verifier import SlotVerifier
from report_json import save_json

SHAPES = {  # Llama 3.2 1B and Llama 3 8B, with the default model's vocabulary; the default model's own shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True),  # the default model's (SmolLM2-135M) shape
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),  # checks that the script runs (--device cpu)
}
RATED_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, the vendors' figures (SXM)
TAUS = (2.0, 3.0, 4.0)


def copy_bandwidth(device) -> float:
    """Bytes per second a large device-to-device copy moves (read + write)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 10 * 2 * x.numel() / (time.perf_counter() - t0)


def build(shape: str, vocab_size: int, device) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=500000.0,
                         **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


CONFIGS = {  # name: (the base's forward compiled, the drafter's levels compiled); compiled_drafter is what the
    # decoder does by default on a GPU in bfloat16 (SpeculativeDecoder's compile and compile_drafter "auto"), which
    # the probes of sessions 26 and 27 did not run: their trees were drafted by levels captured op by op
    "graphs": (False, False), "compiled": (True, False), "compiled_drafter": (True, True)}
DEFAULT_TREES = ("dynamic-64-8-8:full",)  # the issues' reference: 64 nodes, beam 8, 8 levels, the whole vocabulary
SHORT_TURN = 16  # new tokens of the short turn whose time is taken from the long one's (``loop_ms``)
KERNELS_LISTED = 20  # ``--kernels``: the costliest kernels by name, beside the totals by kind
KERNEL_KINDS = (  # (kind, lower-case parts of a kernel's name), the first that matches
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("fused (inductor)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lower for p in parts)), "other")


def tree_spec(text: str) -> tuple[str, str]:
    """TREE:DRAFT_VOCAB (e.g. dynamic-32-8-3:16384; the vocabulary 'full' where left out)."""
    tree, _, vocab = text.partition(":")
    return tree, vocab or "full"


def decoder_for(model, tokenizer, drafter, compile: bool, compile_drafter: bool, tree: str, draft_vocab: str,
                sync_timing: bool, attention_route: str = "repeated"):
    return chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=tree if drafter is not None else "auto",
                                      draft_vocab=draft_vocab if drafter is not None else "auto",
                                      sync_timing=sync_timing, adaptive=False, calibrate=False, compile=compile,
                                      compile_drafter=compile_drafter, attention_route=attention_route)


def loop_ms(decoder, prompt: list[int], new_tokens: int) -> dict:
    """ms a step as decoding runs: (long turn - short turn) / (their difference in steps), no synchronisation."""
    short = decoder.generate(input_ids=prompt, max_new_tokens=SHORT_TURN)
    long = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
    steps = long.steps - short.steps
    return {"loop_ms": round(1000 * (long.seconds - short.seconds) / steps, 3), "loop_steps": steps}


REPLAYS = 20  # ``replay_ms``: timed replays of each graph, after one untimed


def graph_ms(graph, device) -> float:
    """ms one replay of ``graph`` takes, over REPLAYS replays after an untimed one."""
    graph.replay()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    synchronize(device)
    return round(1000 * (time.perf_counter() - start) / REPLAYS, 3)


def replay_ms(decoder) -> dict:
    """ms each captured forward takes replayed alone, without the host, the acceptance or the other parts of a step:
    "verify", the verifier's scoring graphs by capacity and tree size (a plain step is a 1-node tree); "draft", the
    drafter's proposals by window; "advance", its reading of the accepted path (drafting's cost too). The advance
    moves the drafter's length along, so its state is put back after its replays; the KV compaction, which moves the
    cache's, is left out (a few small copies)."""
    out = {"verify": {}, "draft": {}, "advance": None}
    if decoder.device.type != "cuda":
        return out
    for key, (graph, _, _) in decoder.verifier.runner.captured.items():
        if key[0] == "score":  # ("score", capacity, topology)
            out["verify"].setdefault(key[1], {})[key[2].size] = graph_ms(graph, decoder.device)
    drafter = decoder.drafter
    for key, (graph, _, _) in getattr(getattr(drafter, "runner", None), "captured", {}).items():
        if key == "advance":
            with drafter.state_kept(drafter.state):
                out["advance"] = graph_ms(graph, decoder.device)
        elif key[0] == "propose":  # ("propose", window)
            out["draft"][key[1]] = graph_ms(graph, decoder.device)
    return out


def our_steps(model, tokenizer, drafter, prompt: list[int], new_tokens: int, compile: bool,
              compile_drafter: bool = False, tree: str = "auto", draft_vocab: str = "full",
              attention_route: str = "repeated") -> dict:
    """A step of our loop, as it runs (``loop_ms``) and split as the loop times it when synchronised, after a
    warm-up that captures (and compiles) every shape the turns need."""
    t0 = time.perf_counter()
    decoder = decoder_for(model, tokenizer, drafter, compile, compile_drafter, tree, draft_vocab, sync_timing=True,
                          attention_route=attention_route)
    decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
    warm = time.perf_counter() - t0
    r = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
    steps = r.steps - 1
    split = {k: round(1000 * getattr(r, f"time_{k}") / steps, 3) for k in ("draft", "verify", "other")}
    decoder.sync_timing = False  # the same captures, timed as decoding runs (the switch only waits in the clock)
    return {**loop_ms(decoder, prompt, new_tokens), "replay_ms": replay_ms(decoder),
            "synchronised_ms": round(1000 * (r.seconds - r.time_prefill) / steps, 3),
            "split": split, "steps": steps, "warm_up_s": round(warm, 1), "forward": decoder.verifier.describe()}


def profiled(fn, device) -> dict[str, list[float]]:
    """Each kernel name's [count, device us] while ``fn`` runs under torch.profiler (on a CPU, a check that the script
    runs: operators and their own time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kernels = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        synchronize(device)
    names: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == kernels:
            count_us = names.setdefault(e.name, [0, 0.0])
            count_us[0] += 1
            count_us[1] += e.device_time if cuda else e.self_cpu_time_total
    return names


def kernel_table(by_name: dict[str, list[float]]) -> dict:
    """Kernels of one step (or replay), [count, device us] by name: totals by kind (``kernel_kind``), and the
    costliest by name."""
    per_step: dict[str, dict[str, float]] = {}
    for name, (count, us) in by_name.items():
        kind = per_step.setdefault(kernel_kind(name), {"kernels": 0.0, "device_us": 0.0})
        kind["kernels"] += count
        kind["device_us"] += us
    costliest = sorted(by_name.items(), key=lambda item: -item[1][1])[:KERNELS_LISTED]
    return {"per_step": {kind: {k: round(v, 1) for k, v in totals.items()} for kind, totals in per_step.items()},
            "kernels": round(sum(k["kernels"] for k in per_step.values()), 1),
            "device_us": round(sum(k["device_us"] for k in per_step.values()), 1),
            "costliest": [{"name": name[:100], "per_step": round(count, 1), "device_us": round(us, 1)}
                          for name, (count, us) in costliest]}


def drafting_kernels(drafter, device) -> dict:
    """The drafter's own graphs, each replayed alone REPLAYS times under the profiler: the kernels of one proposal
    (its widest window) and of one advance, by kind and by name, apart from the verifying forward's that a tree
    step's list mixes them with (issue #16: on an H100 in session 26 three levels of the 8B shape's drafter took
    three times the time their bytes take to read)."""
    captured = getattr(getattr(drafter, "runner", None), "captured", {})
    widest = max((key for key in captured if key[0] == "propose"), key=lambda key: key[1], default=None)
    out = {}
    for name, key in (("propose", widest), ("advance", "advance")):
        if key in captured:
            graph = captured[key][0]
            with drafter.state_kept(drafter.state):  # an advance's replays move the state along
                graph.replay()
                names = profiled(lambda: [graph.replay() for _ in range(REPLAYS)], device)
            out[name] = kernel_table({n: [count / REPLAYS, us / REPLAYS] for n, (count, us) in names.items()})
    if widest in captured:
        out["propose"]["window"] = widest[1]
    return out


def step_kernels(model, tokenizer, prompt: list[int], new_tokens: int, drafter=None, tree: str = "auto",
                 draft_vocab: str = "auto", attention_route: str = "repeated", compile_drafter: bool = True) -> dict:
    """A compiled step's kernels by kind (``kernel_kind``) and the costliest by name: count and device microseconds
    a step, from the difference of a short and a long turn, each under torch.profiler, the base's compiled forward
    run without a graph. A plain step without ``drafter``; with it, a speculative step over ``tree``, whose drafting
    stays in its CUDA graphs, whose kernels the profiler lists one by one too (session 27: the drafter's 8
    vocabulary projections a step showed by name): the list is drafting's, the verifying forward's and the
    acceptance's kernels together; "drafting" lists the drafter's graphs' alone (``drafting_kernels``)."""
    decoder = decoder_for(model, tokenizer, drafter, True, compile_drafter, tree, draft_vocab, sync_timing=False,
                          attention_route=attention_route)
    decoder.verifier = SlotVerifier(model, graphs=False, compiled=True, features=decoder.verifier.features,
                                    attention_route=attention_route)  # the base's forward ungraphed
    device = decoder.device
    decoder.generate(input_ids=prompt, max_new_tokens=SHORT_TURN)  # compiled shapes, outside the profile

    def turn(tokens: int) -> tuple[dict, int]:
        """Each kernel name's [count, device us] over a turn of ``tokens`` new tokens, and the turn's steps."""
        result = []
        names = profiled(lambda: result.append(decoder.generate(input_ids=prompt, max_new_tokens=tokens)), device)
        return names, result[0].steps

    (short, short_steps), (long, long_steps) = turn(SHORT_TURN), turn(new_tokens)
    steps = long_steps - short_steps
    by_name = {name: [(count - short.get(name, [0, 0.0])[0]) / steps, (us - short.get(name, [0, 0.0])[1]) / steps]
               for name, (count, us) in long.items()}
    table = {"steps": steps, **kernel_table(by_name)}
    if drafter is not None and device.type == "cuda":
        table["drafting"] = drafting_kernels(decoder.drafter, device)
    return table


def replayed_over_plain(spec: dict, plain: dict) -> dict:
    """The tree's graphs replayed alone (``replay_ms``) over the plain step's forward: "verify N slots", its
    verifying forward over a plain one over as many slots (issue #15's verify cost without acceptance, compaction or
    host work); "draft", its longest proposal and the advance together (issue #16's drafting cost)."""
    ones = {capacity: sizes[1] for capacity, sizes in plain["replay_ms"]["verify"].items() if 1 in sizes}
    ratios = {f"verify {capacity} slots": round(ms / ones[capacity], 3)
              for capacity, sizes in spec["replay_ms"]["verify"].items() if capacity in ones
              for size, ms in sizes.items() if size > 1}
    if spec["replay_ms"]["draft"] and ones:
        drafting = max(spec["replay_ms"]["draft"].values()) + (spec["replay_ms"]["advance"] or 0.0)
        ratios["draft"] = round(drafting / max(ones.values()), 3)
    return ratios


def hf_compiled_ms(model, tokenizer, prompt: list[int], new_tokens: int) -> dict:
    method = HFGenerate(model, tokenizer, static=True, decoding=Decoding())
    t0 = time.perf_counter()
    warm_up_static(method, 16)
    warm = time.perf_counter() - t0
    turn = method(prompt, new_tokens)
    return {"ms_per_token": round(1000 * turn.seconds / len(turn.token_ids), 3), "warm_up_s": round(warm, 1)}


def route_suffix(route: str) -> str:
    """What a row's name gains for an attention route: nothing for transformers' own ("repeated"), whose rows kept
    these names until session 28; the route's name for the others ("folded": the decoder's default since)."""
    return "" if route == "repeated" else f" {route}"


def random_token_counts(vocab_size: int) -> torch.Tensor:
    """Token counts for a random drafter's draft vocabulary: a fixed random order (the ids a real drafter's most
    written tokens would be, scattered over the vocabulary)."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0)).float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip hf-compiled (its compilation takes minutes)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="graphs: op by op in CUDA graphs; compiled: the base's forward compiled; compiled_drafter: "
                        "the drafter's levels compiled too (default: all)")
    p.add_argument("--trees", nargs="+", default=list(DEFAULT_TREES), type=tree_spec,
                   help="speculative steps to time, each TREE:DRAFT_VOCAB (default dynamic-64-8-8:full; the "
                        "GPU's calibrated choice for the default model in session 25: dynamic-32-8-3:16384)")
    p.add_argument("--plain-only", action="store_true", help="our plain step only (no drafter, no tree)")
    p.add_argument("--kernels", action="store_true", help="a compiled plain step's kernels by kind")
    p.add_argument("--attention", nargs="+", default=["folded"], choices=list(VERIFIER_ATTENTION),
                   help="the verifier's attention routes to time (verifier.SlotVerifier's attention_route): repeated "
                        "(transformers' SDPA, the keys copied per query head under a mask), grouped (one-token steps "
                        "through SDPA's grouped-query kernel), folded (those too, and a tree's query heads folded onto "
                        "their key head; the decoder's with a compiled forward, the default); --kernels lists each "
                        "one's")
    p.add_argument("--max-autotune-gemm", action="store_true",
                   help="inductor picks each matrix product's kernel by timing its Triton templates against cuBLAS "
                        "(max_autotune_gemm): for a tree's many-token products, which are not matrix-vector "
                        "reductions (compiles for minutes)")
    p.add_argument("--device", default="cuda", help="cuda (a CPU run only checks that the script runs)")
    p.add_argument("--tokenizer", help="a directory holding the default model's tokenizer (tokenizer.save_pretrained): "
                                       "the probe then starts on the GPU machine before the model's weights are there "
                                       "(default: the default model's own)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    quiet_libraries()
    if args.max_autotune_gemm:  # global: the shared compiled decoder passes only coordinate_descent_tuning itself
        torch._inductor.config.max_autotune_gemm = True
    device = torch.device(args.device)
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        _, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rated = next((v for k, v in RATED_BANDWIDTH.items() if k in name), None)
    copied = copy_bandwidth(device) if device.type == "cuda" else None
    report = {"device": name, "torch": torch.__version__, "rated_bandwidth_TBps": rated and rated / 1e12,
              "copy_bandwidth_TBps": copied and round(copied / 1e12, 2), "shapes": {}}
    prompt = (torch.arange(args.prompt_tokens) % 1000 + 100).tolist()
    report["inductor_settings"] = {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")}
    report["inductor_settings"]["max_autotune_gemm"] = args.max_autotune_gemm
    for shape in args.shapes:
        model = build(shape, len(tokenizer), device)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        row = {"parameters_M": round(sum(t.numel() for t in model.parameters()) / 1e6, 1),
               "weight_GB": round(weight_bytes / 1e9, 3),
               "floor_ms_rated": rated and round(1000 * weight_bytes / rated, 3),
               "floor_ms_copy": copied and round(1000 * weight_bytes / copied, 3)}
        drafter = ChimeraDrafter.for_base(model, num_draft_heads=8).to(device=device, dtype=torch.bfloat16).eval()
        drafter.token_counts = random_token_counts(drafter.config.vocab_size)
        row["drafter_parameters_M"] = round(sum(t.numel() for t in drafter.parameters()) / 1e6, 1)
        for tag in args.configs:
            compile, compile_drafter = CONFIGS[tag]
            row[tag] = {}
            for route in args.attention:
                named = route_suffix(route)
                plain = our_steps(model, tokenizer, None, prompt, args.new_tokens, compile, attention_route=route)
                row[tag]["plain" + named] = plain
                if rated:
                    row[tag]["plain_bandwidth_pct" + named] = round(
                        100 * weight_bytes / rated / (plain["loop_ms"] / 1000), 1)
                for tree, vocab in [] if args.plain_only else args.trees:
                    spec = our_steps(model, tokenizer, drafter, prompt, args.new_tokens, compile, compile_drafter,
                                     tree, vocab, attention_route=route)
                    r = spec["loop_ms"] / plain["loop_ms"]
                    row[tag][f"{tree}:{vocab}{named}"] = {
                        **spec, "r": round(r, 3), "replayed_over_plain": replayed_over_plain(spec, plain),
                        "draft_over_plain": round(spec["split"]["draft"] / plain["loop_ms"], 3),
                        "verify_over_plain": round(spec["split"]["verify"] / plain["loop_ms"], 3),
                        "speedup_at_tau": {str(t): round(t / r, 2) for t in TAUS}}
            print(shape, tag, json.dumps(row[tag]), flush=True)
            save_json(report | {"shapes": {**report["shapes"], shape: row}}, args.out)
        drafting_compiled = CONFIGS[args.configs[-1]][1]  # the trees' kernels drafted as the last config drafts
        for route in args.attention if args.kernels else []:
            named = route_suffix(route)
            row["plain_kernels" + named] = step_kernels(model, tokenizer, prompt, args.new_tokens,
                                                        attention_route=route)
            print(shape, "kernels" + named, json.dumps(row["plain_kernels" + named]), flush=True)
            for tree, vocab in [] if args.plain_only else args.trees:
                key = f"kernels {tree}:{vocab}{named}"
                row[key] = step_kernels(model, tokenizer, prompt, args.new_tokens, drafter, tree, vocab, route,
                                        drafting_compiled)
                print(shape, key, json.dumps(row[key]), flush=True)
        if not args.no_hf:
            row["hf_compiled"] = hf_compiled_ms(model, tokenizer, prompt, args.new_tokens)
            print(shape, "hf-compiled", json.dumps(row["hf_compiled"]), flush=True)
        report["shapes"][shape] = row
        del model, drafter
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save_json(report, args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
