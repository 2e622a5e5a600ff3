"""The one place where the fixed-shape parts of a decoding step are captured as CUDA graphs and replayed.

On a GPU a small model's step is bound by kernel launches, not arithmetic (an eager forward of SmolLM2-135M
on an H200 costs about 19 ms whatever the tree size), so every fixed-shape function of the step (scoring a
tree, compacting the cache, drafting, advancing the drafter) is captured once per shape and replayed. Callers
name each function by a key that fixes its shapes (what and which tree, window or capacity) and ask the runner
to ``run`` it: with graphs off, the very same function simply runs eagerly, which is how the CPU tests cover
what the GPU replays. Whether the function itself is compiled (compiled.py) is a separate switch.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


def power_of_two_at_least(n: int, smallest: int) -> int:
    """Graph shapes come in powers of two, so a few captures cover every length."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def capture_graph(fn: Callable[[], object], warmup: int = 2, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` a few times on a side stream (lazy allocations, compilation and autotuning happen there), then
    capture it. Returns the graph and what the captured call returned: tensors that every replay refills.
    ``fn`` must read its inputs from tensors that stay in place and must not synchronise with the host. ``pool``: a
    memory pool shared with other captures (``GraphRunner``), else the graph's own."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


class GraphRunner:
    """Runs ``fn(*inputs)`` for a key that fixes its shapes: eagerly, or (graphs on) by replaying its capture.

    On the first run of a key the runner keeps its own copies of the inputs and captures ``fn`` over them; each
    later run copies the new inputs into those copies and replays. An input shorter than its copy (along the first
    axis) fills the leading part and leaves the rest as it was: the caller's way to pass a variable-length path
    into a graph that reads a padded one. ``fn`` must be deterministic in everything but its inputs' values.

    ``shared_pool``: every capture allocates from one memory pool, as vLLM's captures of its batch sizes do, rather
    than each from its own. A replay's intermediates are dead once it ends, and its outputs stay allocated as long
    as its graph does, so graphs replayed one after another on one stream can share their memory; each would
    otherwise keep the peak of its own capture (a running batch captures every rows bucket over every window at each
    depth: 144 graphs for 64 rows of 2,048 slots, the largest of them holding its chains' logits, 64 x 4 x 49,152
    floats).
    """

    def __init__(self, graphs: bool, shared_pool: bool = False):
        self.graphs = graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs and shared_pool else None
        self.captured: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], object]] = {}

    def can_run(self, key: Hashable) -> bool:
        """Whether ``key`` is captured already (a run of it then launches nothing but the graph)."""
        return key in self.captured

    def capture(self, key: Hashable, fn: Callable[..., object], *inputs: torch.Tensor, warmup: int = 2) -> None:
        """Capture ``fn`` over copies of ``inputs`` (after ``warmup`` real runs of it, which the caller undoes where
        ``fn`` changes state); ``run`` does this itself the first time it meets a key."""
        static = tuple(x.clone() for x in inputs)
        graph, output = capture_graph(lambda: fn(*static), warmup, self.pool)
        self.captured[key] = (graph, static, output)

    def run(self, key: Hashable, fn: Callable[..., object], *inputs: torch.Tensor):
        if not self.graphs:
            return fn(*inputs)
        if key not in self.captured:
            self.capture(key, fn, *inputs)
        graph, static, output = self.captured[key]
        for buffer, x in zip(static, inputs):
            (buffer if x.shape == buffer.shape else buffer[:x.shape[0]]).copy_(x)
        graph.replay()
        return output

    def forget(self) -> None:
        """Drop every capture (their memory is released with them)."""
        self.captured.clear()
