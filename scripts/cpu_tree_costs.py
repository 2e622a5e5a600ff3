"""Where a CPU's speculative step goes beyond a plain one: the figures behind session 14's CPU section of
docs/benchmarks.md.

1. ``profile``: the costliest operators of a forward over a 3-token tree on a 200-token context (torch.profiler,
   grouped by input shape, 10 forwards), through transformers' own attention and through the verifier's
   (chimera.attention): transformers copies the keys and values of a grouped-query model for a masked multi-token
   query (``aten::copy_`` of (1, kv heads, group, context, head size)).
2. ``draft_projection_ms``: the drafter's projection onto 4,096 draft-vocabulary rows of the default model's head,
   1 to 3 rows, by each route of target.HEAD_ROUTES, with the caches warm and flushed (a 2 GB sweep between calls).
3. ``mkl_packed_ms``: the decoder's linear layers (30 layers of the default model's shapes, streamed from memory) at 1
   to 8 rows: the stock product against MKL's own prepacked one (packed for 1, 4 or 8 rows), and whether the results
   are the same bits.
4. With --compile-drafter: a proposal of the shipped drafter (a 3-node chain, 4,096-token draft vocabulary) op by op
   and with its levels through torch.compile (the first call, then the median of the next ones).

Usage: python scripts/cpu_tree_costs.py [--compile-drafter] [--out FILE.json]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import chimera
from chimera import attention, cache as kv, target
from chimera.calibration import median_ms, processor_name
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.tree import TreeBuffers, TreeTopology, tree_attention_mask
from report_json import print_and_save

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def tree_profile(model, top: int = 6) -> list[dict]:
    cache = kv.new_cache()
    prompt = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(0))
    target.forward(model, cache, prompt)
    tree = TreeBuffers.build(TreeTopology.chain(2), "cpu")
    tokens = torch.randint(100, 40000, (3,), generator=torch.Generator().manual_seed(1))
    mask = tree_attention_mask(200, tree.ancestors, model.dtype)

    def forward():
        target.forward(model, cache, tokens, 200 + tree.depths, mask)
        kv.truncate(cache, 200)

    for _ in range(3):
        forward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
            forward()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "shapes": str(e.input_shapes)[:80], "calls": e.count,
             "ms_a_forward": round(e.self_cpu_time_total / 1000 / 10, 2)} for e in rows]


def draft_projection_ms(model) -> dict:
    weight = model.get_output_embeddings().weight.detach()[:4096].contiguous()
    sweep = torch.empty(512 * 1024 * 1024 // 4 * 4)  # 2 GB: evicts the rows from every cache level
    out = {}
    for rows in (1, 2, 3):
        z = torch.randn(rows, weight.shape[1])
        for route in target.HEAD_ROUTES:
            head = target.weight_head(weight, route)
            flushed = median_ms(lambda: head(z), 30, 3, before=lambda: sweep.fill_(0))
            out[f"{rows} rows/{route}"] = {"warm": round(median_ms(lambda: head(z), 30, 3), 3),
                                           "flushed": round(flushed, 3)}
    return out


def mkl_packed_ms() -> dict:
    weights = [torch.randn(o, i) for o, i in LAYER_SHAPES * 30]  # 425 MB: streamed from memory
    out = {}
    for packed_for in (1, 4, 8):
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, packed_for) for w in weights]
        for rows in (1, 3, 4, 8):
            xs = {i: torch.randn(rows, i) for i in (576, 1536)}
            stock = round(median_ms(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], 10, 3), 3)
            mkl = round(median_ms(lambda: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, packed_for)
                                           for w, p in zip(weights, packed)], 10, 3), 3)
            same = torch.equal(F.linear(xs[576], weights[4]),
                               torch.ops.mkl._mkl_linear(xs[576], packed[4], weights[4], None, packed_for))
            out[f"packed for {packed_for}/{rows} rows"] = {"stock_ms": stock, "mkl_packed_ms": mkl, "same_bits": same}
    return out


def drafter_compile(model) -> dict:
    drafter = resolve_drafter("auto", model)
    drafter.use_draft_vocabulary(4096)
    tokens = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = drafter.start(tokens, target.forward(model, kv.new_cache(), tokens).hidden)
    root, tree = tokens[-1:], TreeBuffers.build(TreeTopology.chain(2), "cpu")

    def propose(levels):
        with torch.inference_mode():  # as the decoder drafts; the drafter itself was loaded outside it
            return drafter._propose(state, root, tree, state.keys[:, :state.length],
                                    state.values[:, :state.length], None, state.length, levels)

    eager = round(median_ms(lambda: propose(None), 30, 3), 3)
    levels = drafter.compiled_levels("inductor")
    start = time.perf_counter()
    propose(levels)
    first = time.perf_counter() - start
    return {"eager_ms": eager, "compiled_first_call_s": round(first, 1),
            "compiled_ms": round(median_ms(lambda: propose(levels), 10, 3), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile-drafter", action="store_true", help="also time the drafter's levels compiled (slow)")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_libraries()
    model, _ = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cpu")
    with torch.inference_mode():
        report = {"processor": processor_name(), "threads": torch.get_num_threads(),
                  "profile_transformers_attention": tree_profile(model),
                  "profile_grouped_attention": tree_profile(attention.verifying_model(model)),
                  "draft_projection_ms": draft_projection_ms(model),
                  "mkl_packed_ms": mkl_packed_ms()}
    if args.compile_drafter:
        report["drafter_compile"] = drafter_compile(model)
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
