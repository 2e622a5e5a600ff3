"""Device time of two parts of a speculative step on a GPU, measured alone in CUDA graphs, per way of running them:

1. ``attention``: one layer's attention of a 64-node tree (and of one token) over a slot cache of C slots with an
   additive mask, per scaled-dot-product backend (PyTorch's choice, math, memory-efficient, cuDNN), the default
   model's heads (9 query, 3 key/value, 64 wide; keys repeated for the query heads as transformers does with a
   mask). The step anatomy (scripts/step_anatomy.py) found the tree's forward growing with the capacity.
2. ``compaction``: moving an accepted path of 9 slots in 30 layers' keys and values (the default model's), as one
   index_select and one index_copy_ per tensor (120 kernels, today), the same through torch.compile (with and
   without inductor's combo kernels), and over one tensor holding every layer (2 kernels).

    python scripts/step_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chimera.graph_runner import capture_graph
from report_json import save_json

REPEATS = 20


def device_ms(fn, repeats: int = REPEATS) -> float:
    """Device milliseconds per call of ``fn``, captured ``repeats`` times in one CUDA graph (the loop's own
    capture, graph_runner.capture_graph) and replayed."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(repeats)], warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / repeats)
    return sorted(times)[len(times) // 2]


BACKENDS = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention(heads: int = 9, kv_heads: int = 3, width: int = 64) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for queries in (1, 64):
        for capacity in (512, 1024, 2048, 4096):
            q = torch.randn(1, heads, queries, width, device="cuda", dtype=dtype)
            k = torch.randn(1, kv_heads, capacity, width, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            allowed = torch.rand(queries, capacity, device="cuda") < 0.5
            allowed[:, 0] = True
            mask = torch.zeros(1, 1, queries, capacity, device="cuda", dtype=dtype).masked_fill(~allowed, -1e30)
            group = heads // kv_heads

            def run():
                kk = k.repeat_interleave(group, 1)
                vv = v.repeat_interleave(group, 1)
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

            row = {"queries": queries, "capacity": capacity}
            for name, backend in BACKENDS.items():
                context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                try:
                    with context:
                        row[name] = round(device_ms(run), 4)
                except RuntimeError as exc:
                    row[name] = f"unavailable: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def compaction(layers: int = 30, kv_heads: int = 3, width: int = 64, capacity: int = 1024) -> list[dict]:
    dtype = torch.bfloat16
    tensors = [torch.randn(1, kv_heads, capacity, width, device="cuda", dtype=dtype) for _ in range(2 * layers)]
    storage = torch.randn(layers, 2, 1, kv_heads, capacity, width, device="cuda", dtype=dtype)
    source = torch.tensor([300, 302, 305, 306, 310, 311, 315, 318, 320], device="cuda")
    target = torch.arange(300, 309, device="cuda")

    def per_tensor(tensors=tensors):
        for t in tensors:
            t.index_copy_(2, target, t.index_select(2, source))

    def one_storage():
        storage.index_copy_(4, target, storage.index_select(4, source))

    rows = [{"variant": "index_select + index_copy_ per tensor", "ms": device_ms(per_tensor)},
            {"variant": "one tensor for every layer", "ms": device_ms(one_storage)}]
    for name, options in (("torch.compile", {}), ("torch.compile, combo kernels", {"combo_kernels": True})):
        try:
            compiled = torch.compile(per_tensor, options=options)
            rows.append({"variant": name, "ms": device_ms(compiled)})
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            rows.append({"variant": name, "ms": f"failed: {str(exc).splitlines()[0][:100]}"})
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["attention"] = attention()
    report["compaction"] = compaction()
    save_json(report, args.out)


if __name__ == "__main__":
    main()
