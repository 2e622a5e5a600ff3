"""Which attention kernel suits a running batch's plain step on a GPU: one query token a row over each row's keys.

Session 16 compiled the batch's step and folded each group's query heads into queries of their key head
(attention.batch_attention), yet 64 rows over 2,048 slots still cost an H100 11.6 ms a step against 2.0 ms for
one row (docs/gpu/batch_step_cost_session16_compiled_h100.json): 30 layers reading 64 x 2,048 slots of keys and
values, 1.5 GB, should take about 0.5 ms at the card's bandwidth. This script times one layer's attention of that
shape by each route, in bfloat16, with each row's length drawn between half the slots and all of them:

- ``repeat``: keys and values repeated per query head, SDPA with the mask (transformers' path for a masked query)
- ``folded``: the batch's folded route (attention._folded_sdpa: SDPA's own choice of kernel until session 20, cuDNN's
  first since), then each kernel forced
- ``gqa``: SDPA's ``enable_gqa`` with the mask
- ``heads``: each query token read as a query head of its own, one query each, grouped SDPA with the mask repeated
  per head (attention._heads_sdpa, session 21: one query a row is the shape whose grouped kernel is split along the
  slots)
- ``flex``: flex_attention (compiled) over a block mask from the lengths, which skips blocks past a row's length
- ``compiled_math``: matmul, softmax, matmul in one torch.compile'd function

``--queries 4`` times a drafted chain's verification instead (batch.py): 4 query tokens a row, each attending up to
its own position. Session 19 measured on an H200 that the forward verifying chains of 4 tokens over 64 rows cost
3.8 ms against about 1.5 ms for one token a row (docs/benchmarks.md): this separates the attention's share.

    python scripts/batch_attention_kernels.py --rows 16 64 --slots 2048 --out batch_attention_kernels.json
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from chimera.attention import _folded_sdpa, _heads_sdpa
from report_json import save_json


def time_us(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # a CPU: the script's own check, not a figure
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e6 * (time.perf_counter() - start) / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats


def routes(query, key, value, mask, lengths):
    rows, heads, queries, size = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = query.reshape(rows, kv_heads, groups * queries, size)  # a group's heads, each with its queries in turn
    folded_mask = mask.repeat(1, 1, groups, 1)  # (rows, 1, groups x queries, slots): the same order
    out = {
        "repeat": lambda: F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                                         value.repeat_interleave(groups, 1), attn_mask=mask),
        # the running batch's own folded route (attention.batch_attention_folded, its output as (rows, queries, heads,
        # size)); the forced kernels below run the same folding
        "folded": lambda: _folded_sdpa(query, key, value, mask, None)[0].transpose(1, 2),
        "folded_sdpa_choice": lambda: F.scaled_dot_product_attention(folded, key, value, attn_mask=folded_mask),
        "gqa": lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True),
        # the candidate of session 21 (attention.batch_attention_heads): each query token a query head, one query each
        "heads": lambda: _heads_sdpa(query, key, value, mask, None)[0].transpose(1, 2),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def forced(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(folded, key, value, attn_mask=folded_mask)
        out[f"folded_{name}"] = forced

    def math(q, k, v, m):
        scores = (q @ k.transpose(-1, -2)) * size ** -0.5 + m
        return scores.float().softmax(-1).to(v.dtype) @ v
    compiled_math = torch.compile(math)
    out["compiled_math"] = lambda: compiled_math(folded, key, value, folded_mask)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
        block_mask = create_block_mask(lambda b, h, q, kv: kv <= lengths[b] + q, rows, None, queries, key.shape[2],
                                       device=query.device)
        out["flex"] = lambda: flex(query, key, value, block_mask=block_mask, enable_gqa=True)
    except Exception as exc:  # noqa: BLE001 - a torch without flex attention: noted, not fatal
        print(f"flex attention unavailable: {type(exc).__name__}: {exc}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--slots", type=int, nargs="+", default=[2048])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--queries", type=int, nargs="+", default=[1],
                   help="query tokens a row: 1 for a plain step, depth + 1 for a drafted chain's verification")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "results": []}
    for slots, rows, queries in [(s, r, q) for s in args.slots for r in args.rows for q in args.queries]:
        query = torch.randn(rows, args.heads, queries, args.head_size, device=device, dtype=torch.bfloat16,
                            generator=gen)
        key, value = torch.randn(2, rows, args.kv_heads, slots, args.head_size, device=device,
                                 dtype=torch.bfloat16, generator=gen)
        lengths = torch.randint(slots // 2, slots - queries, (rows,), device=device, generator=gen)
        # query i of a row sits at position length + i and sees every slot up to it
        allowed = torch.arange(slots, device=device)[None, None, :] <= (
            lengths[:, None, None] + torch.arange(queries, device=device)[None, :, None])
        mask = torch.zeros(rows, 1, queries, slots, device=device, dtype=torch.bfloat16).masked_fill(
            ~allowed[:, None], float("-inf"))
        gigabytes = 2 * key.numel() * key.element_size() / 1e9
        row = {"rows": rows, "slots": slots, "queries": queries, "kv_gb": round(gigabytes, 4)}
        groups = args.heads // args.kv_heads
        reference = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                                   value.repeat_interleave(groups, 1), attn_mask=mask)
        for name, fn in routes(query, key, value, mask, lengths).items():
            try:
                result = fn().reshape(reference.shape)
                error = (result.float() - reference.float()).abs().max().item()
                us = time_us(fn)
                row[name] = {"us": round(us, 1), "gb_per_s": round(gigabytes / us * 1e6, 1),
                             "max_error": round(error, 4)}
            except Exception as exc:  # noqa: BLE001 - a kernel that refuses the shape: noted
                row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    save_json(report, args.out)


if __name__ == "__main__":
    main()
