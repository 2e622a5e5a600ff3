"""Drafting through a captured CUDA graph.

On a GPU a small model's step is bound by kernel launches, not arithmetic: drafting six tree levels
launches a few hundred small kernels (about 10 ms on an H200 in eager mode). A drafter whose drafting has
fixed shapes and reads nothing on the host (``propose_static``) is captured once per decoder and replayed
every step. The graph reads one persistent ``DraftState`` whose buffers never move (its capacity is the
model's context), so each request refills that state in place instead of making a new one.
"""

from __future__ import annotations

import torch

from ..tree import TreeBuffers


class GraphedDrafter:
    """The Drafter interface over one topology, drafted by replaying a CUDA graph."""

    def __init__(self, drafter, tree: TreeBuffers, capacity: int):
        self.drafter = drafter
        self.tree = tree
        self.capacity = capacity
        self.state = None
        self.graph = None
        self.root = None
        self.tokens = None

    MAX_CAPACITY = 16384  # beyond this, attending over the masked capacity costs more than launches save

    @classmethod
    def supported(cls, drafter, device: torch.device, capacity: int) -> bool:
        return device.type == "cuda" and hasattr(drafter, "propose_static") and capacity <= cls.MAX_CAPACITY

    def start(self, prompt_ids: torch.Tensor, hidden: torch.Tensor):
        self.state = self.drafter.start(prompt_ids, hidden, capacity=self.capacity, reuse=self.state)
        return self.state

    def advance(self, state, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        self.drafter.advance(state, tokens, hidden)

    def propose(self, state, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        if tree is not self.tree:  # another topology (the decoder never asks for one; kept correct anyway)
            return self.drafter.propose(state, root, tree)
        if self.graph is None:
            self._capture(root)
        self.root.copy_(root.reshape(1))
        self.graph.replay()
        return self.tokens

    def _capture(self, root: torch.Tensor) -> None:
        self.root = root.reshape(1).clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as torch.cuda.graphs asks
            for _ in range(2):
                self.drafter.propose_static(self.state, self.root, self.tree)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.tokens = self.drafter.propose_static(self.state, self.root, self.tree)
