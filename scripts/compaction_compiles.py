"""Compilation time of the KV compaction (SlotBank.keep) for accepted paths of 2..9 slots, each path length met for
the first time, in one fresh process: what a first calibration or bench pays before its trees of every depth run.

Since session 24 the path length is compiled as a symbol (verifier.SlotBank.keep_static), so the first length
compiles and the others reuse it; before, every length compiled again (on an H100 the default model's took 14-16 s
each, six lengths in a first calibration). Inductor's on-disk cache is pointed at a fresh directory, so nothing is
read back from an earlier run. Then the time of a compiled 9-slot keep (no CUDA graph: the host's launches count).

    python scripts/compaction_compiles.py                                   # a tiny random Llama on the CPU
    python scripts/compaction_compiles.py --model smollm2-135m-instruct --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPEATS = 200


def timed(device: torch.device, fn) -> float:
    """Seconds ``fn()`` takes, the device's queued work included."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny", help="tiny (a 2-layer random Llama, as the tests build) or a base")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--capacity", type=int, default=256)
    args = p.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    import chimera
    from chimera.compiled import CompiledDecoder
    from chimera.tree import TreeBuffers, TreeTopology
    from chimera.verifier import SlotBank

    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import tiny_model
        model = tiny_model("llama").to(args.device)
    else:
        model, _ = chimera.load_base(args.model, dtype=args.dtype, device=args.device)
    device = torch.device(args.device)
    bank = SlotBank(model, capacity=args.capacity, device=device, decoder=CompiledDecoder(model))
    bank.prefill(torch.arange(3, 10, device=device))
    total = 0.0
    for depth in range(1, 9):
        tree = TreeBuffers.build(TreeTopology.from_paths([(0,) * k for k in range(1, depth + 1)]), device)
        seconds = timed(device, lambda: bank.keep(torch.arange(depth + 1, device=device), tree))
        total += seconds
        print(f"{depth + 1}-slot paths: {seconds:.2f} s", flush=True)
    print(f"all: {total:.1f} s; compiled: {bank.move.describe()}")
    path = torch.arange(9, device=device)  # then the cost of a compiled keep, the deepest tree's (host clock)

    def keeps(count: int) -> None:
        for _ in range(count):
            bank.keep(path, tree)

    timed(device, lambda: keeps(10))
    seconds = timed(device, lambda: keeps(REPEATS))
    print(f"a 9-slot keep: {seconds / REPEATS * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
