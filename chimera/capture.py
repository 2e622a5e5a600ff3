"""Capturing a function of fixed shapes as a CUDA graph, the way ``torch.cuda.graphs`` asks for it."""

from __future__ import annotations

from typing import Callable

import torch


def power_of_two_at_least(n: int, smallest: int) -> int:
    """Graph shapes come in powers of two, so a few captures cover every length."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def capture_graph(fn: Callable[[], object], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` a few times on a side stream (lazy allocations and autotuning happen there), then capture it.

    Returns the graph and what the captured call returned: tensors that every ``graph.replay()`` refills.
    ``fn`` must read its inputs from tensors that stay in place and must not synchronise with the host.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output
