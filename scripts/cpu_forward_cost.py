"""What a base forward over a few tokens costs on this machine, and why: the figures behind the CPU section of
docs/benchmarks.md.

1. The decoder's forward over m tree tokens on a 300-token cache (m = 1 plain; m > 1 a chain with the tree mask),
   with the stock linear layers as transformers runs them, with the attention that does not copy keys
   (chimera.attention, what our loop runs: the copy of the model the verifier uses), and with oneDNN-prepacked
   linear layers (chimera.cpu_linear, on that copy).
2. The throughput of the small matrix products it is made of (the model's own shapes), both ways, against a
   plain sum over a large array (what memory can stream).
3. With --compile: the stock forwards through ``torch.compile`` (first call = compile time).

Usage: python scripts/cpu_forward_cost.py [--sizes 1 5 8 16] [--compile]
"""

import argparse
import json
import time

import torch

import chimera
from chimera import attention, cache as kv, cpu_linear
from chimera.cache_argument import cache_kwargs
from chimera.cli import quiet_libraries
from chimera.tree import TreeBuffers, TreeTopology, tree_attention_mask


def mean_seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def forward_ms(decoder, model, sizes, repeats):
    gen = torch.Generator().manual_seed(0)
    cache = kv.new_cache()
    with torch.inference_mode():
        decoder(input_ids=torch.randint(100, 40000, (1, 300), generator=gen), use_cache=True,
                **cache_kwargs(decoder, cache))
    prefix = cache.get_seq_length()
    out = {}
    for m in sizes:
        tree = TreeBuffers.build(TreeTopology.chain(m - 1), "cpu")
        tokens = torch.randint(100, 40000, (1, m), generator=gen)
        mask = tree_attention_mask(prefix, tree.ancestors, model.dtype) if m > 1 else None

        def step():
            with torch.inference_mode():
                decoder(input_ids=tokens, position_ids=(prefix + tree.depths)[None], attention_mask=mask,
                        use_cache=True, **cache_kwargs(decoder, cache))
            kv.keep_path(cache, prefix, torch.zeros(0, dtype=torch.long))

        first = time.perf_counter()
        step()
        out[m] = {"first_call_s": round(time.perf_counter() - first, 2),
                  "ms": round(1000 * mean_seconds(step, repeats), 1)}
    return out


def matmul_gb_per_s(model, sizes, repeats):
    """Bytes of weight read per second by the products of the first 10 layers at m rows: through the stock
    ``nn.Linear`` as the model calls them, and through ``PackedLinear``."""
    stock = [m for layer in model.get_decoder().layers[:10] for m in layer.modules() if type(m) is torch.nn.Linear]
    total = sum(m.weight.numel() * m.weight.element_size() for m in stock)
    out = {}
    with torch.inference_mode():
        for route, layers in (("stock", stock), ("packed", [cpu_linear.PackedLinear(m) for m in stock])):
            out[route] = {}
            for m in sizes:
                inputs = {layer.in_features: torch.randn(m, layer.in_features) for layer in layers}
                seconds = mean_seconds(lambda: [layer(inputs[layer.in_features]) for layer in layers], repeats)
                out[route][m] = round(total / seconds / 1e9, 1)
        big = torch.randn(64 * 1024 * 1024)
        out["sum_of_256_MB"] = round(big.numel() * 4 / mean_seconds(big.sum, repeats) / 1e9, 1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 5, 8, 16])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards (minutes)")
    args = p.parse_args()
    quiet_libraries()
    model, _ = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cpu")
    grouped = attention.verifying_model(model)
    packed = cpu_linear.packed_copy(grouped)
    result = {"threads": torch.get_num_threads(),
              "forward": forward_ms(model.get_decoder(), model, args.sizes, args.repeats),
              "forward_grouped_attention": forward_ms(grouped.get_decoder(), grouped, args.sizes, args.repeats),
              "forward_packed": forward_ms(packed.get_decoder(), packed, args.sizes, args.repeats),
              "matmul_GB_per_s": matmul_gb_per_s(model, args.sizes, args.repeats)}
    if args.compile:
        result["compiled_forward"] = forward_ms(torch.compile(model.get_decoder(), dynamic=True), model,
                                                args.sizes, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
