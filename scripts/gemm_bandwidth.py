"""How close a matrix product of few tokens comes to the memory bandwidth (GPU, bfloat16): issue #15's tree verify.

A plain step multiplies one token by every weight (matrix-vector products, which inductor writes as Triton
reductions); verifying a tree of n nodes multiplies n tokens (n = 32 or 64), which goes to cuBLAS. Both read the same
weight bytes, so on a card with the bandwidth to spare a tree should cost about what a plain step does. This times
``F.linear`` for the Llama-3-8B layer's products (and its vocabulary head) at a range of token counts, each weight in
enough copies to overflow the L2 cache, and reports the achieved bytes per second: whether the tree's products, not its
attention, are what make the tree verify cost more than a plain step.

Usage (on the GPU machine): python scripts/gemm_bandwidth.py --out gemm_bandwidth.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from report_json import save_json

PRODUCTS = {  # (in, out) features of a Llama-3-8B layer's products, q/k/v and gate/up fused as inductor sees them
    "qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "head": (4096, 128256)}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
L2_OVERFLOW_BYTES = 512 * 2 ** 20  # enough copies of a weight that each replay reads it from memory


def product_seconds(weight_shape: tuple[int, int], tokens: int, device, repeats: int = 50) -> float:
    """Seconds one ``F.linear`` of ``tokens`` rows takes, each call on another copy of the weight."""
    out_features, in_features = weight_shape[1], weight_shape[0]
    size = out_features * in_features * 2
    copies = max(1, -(-L2_OVERFLOW_BYTES // size))
    weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    for w in weights:
        F.linear(x, w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for i in range(repeats):
        F.linear(x, weights[i % copies])
    end.record()
    torch.cuda.synchronize(device)
    del weights
    return start.elapsed_time(end) / 1000 / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "products": {}}
    for name, shape in PRODUCTS.items():
        row = {}
        for tokens in args.tokens:
            seconds = product_seconds(shape, tokens, device)
            row[str(tokens)] = {"us": round(seconds * 1e6, 1), "TBps": round(shape[0] * shape[1] * 2 / seconds / 1e12, 2)}
        report["products"][name] = row
        print(name, json.dumps(row), flush=True)
    layer = {str(t): round(sum(report["products"][n][str(t)]["us"] for n in ("qkv", "o", "gate_up", "down")), 1)
             for t in args.tokens}
    report["layer_us"] = layer  # one layer's four products; a step has 32 of them and the head once
    report["step_products_ms"] = {t: round((32 * layer[t] + report["products"]["head"][t]["us"]) / 1000, 3)
                                  for t in layer}
    print(json.dumps(report["step_products_ms"]))
    save_json(report, args.out)


if __name__ == "__main__":
    main()
