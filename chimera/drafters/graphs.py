"""Drafting through captured CUDA graphs.

On a GPU a small model's step is bound by kernel launches, not arithmetic: drafting six tree levels
launches a few hundred small kernels (about 10 ms on an H200 in eager mode). A drafter whose drafting has
fixed shapes and reads nothing on the host (``propose_static``) is captured and then replayed every step.
The graphs read one persistent ``DraftState`` whose buffers never move (its capacity is the model's
context), so each request refills that state in place instead of making a new one. Attention over the
verified prefix covers a fixed window of KV slots; one graph per power-of-two window, captured when a
sequence first needs it, keeps short sequences from paying for the whole context.

``compiled`` runs each drafting level's layer, attention and head, and the dynamic tree's choice of candidates,
through torch.compile inside the captured drafting (``ChimeraDrafter.compiled_levels``); the vocabulary projection,
its log-softmax and top-k stay op by op. It drafts the same trees (tests/test_drafter.py). Compiling the whole
drafting function instead measured far slower on an H200 in bfloat16 (11 ms a step against 1.1 ms for the default
model, 61 against 5.0 ms on an 8B shape; docs/benchmarks.md, session 9): inductor splits each reduction over the
vocabulary into many kernels.
"""

from __future__ import annotations

import contextlib

import torch

from ..compiled import announced
from ..graph_runner import GraphRunner, power_of_two_at_least
from ..tree import TreeBuffers

SMALLEST_WINDOW = 256


class GraphedDrafter:
    """The Drafter interface over one topology, drafted by replaying CUDA graphs."""

    MAX_CAPACITY = 16384  # beyond this, attending over masked slots costs more than the launches saved

    def __init__(self, drafter, tree: TreeBuffers, capacity: int, compiled: bool = False,
                 backend: str = "inductor", graphs: bool = True):
        self.drafter = drafter
        self.tree = tree
        self.capacity = capacity
        self.state = None
        self.runner = GraphRunner(graphs)  # graphs=False: the same functions run eagerly (how CPU tests cover them)
        self.count = None  # the advance graph's number of real tokens, a device scalar
        self.width = tree.topology.max_depth + 1  # the deepest accepted path: what the advance graph reads
        # compiled: each drafting level's layer and head through torch.compile, where the drafter has such levels
        self.levels = drafter.compiled_levels(backend) if compiled and hasattr(drafter, "compiled_levels") else None

    @classmethod
    def supported(cls, drafter, device: torch.device, capacity: int) -> bool:
        return device.type == "cuda" and hasattr(drafter, "propose_static") and capacity <= cls.MAX_CAPACITY

    def start(self, prompt_ids: torch.Tensor, hidden: torch.Tensor):
        self.state = self.drafter.start(prompt_ids, hidden, capacity=self.capacity, reuse=self.state)
        return self.state

    def advance(self, state, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """Replays the drafter's ``advance_static`` over inputs padded to the deepest path (one graph for any
        accepted length); the eager ``advance`` where the padded slots would not fit."""
        n = tokens.numel()
        if n > self.width or state.length + 2 * self.width > state.keys.shape[1]:
            self.drafter.advance(state, tokens, hidden)
            return
        self._run_advance(state, tokens, hidden, n)
        state.length += n

    def advance_counted(self, state, tokens: torch.Tensor, hidden: torch.Tensor, count: torch.Tensor) -> None:
        """``advance`` by the first ``count`` (a device scalar nobody has read) of ``tokens`` and ``hidden``, the
        accepted path padded to the deepest one (acceptance.Accepted.path): the host's ``state.length`` lags until
        ``confirm``. The caller leaves room for two paths past the host's length."""
        self._run_advance(state, tokens, hidden, count)

    def confirm(self, state, length: int) -> None:
        """The host has read the length of an ``advance_counted``: its copy catches up with the device's."""
        state.length += length

    def _run_advance(self, state, tokens: torch.Tensor, hidden: torch.Tensor, count: int | torch.Tensor) -> None:
        """Replay the advance graph (captured on first use) over the first ``count`` of ``tokens`` and ``hidden``."""
        if self.count is None:
            self.count = torch.ones((), dtype=torch.long, device=tokens.device)
            self._advance_run = lambda padded_tokens, padded_hidden: self.drafter.advance_static(  # noqa: E731
                self.state, padded_tokens, padded_hidden, self.count)
        if self.runner.graphs and not self.runner.can_run("advance"):
            with self.state_kept(state):  # the capture's warm-up runs advance the state for real
                self.runner.capture("advance", self._advance_run, tokens.new_zeros(self.width),
                                    hidden.new_zeros(self.width, hidden.shape[-1]))
        if isinstance(count, torch.Tensor):
            self.count.copy_(count)  # on the device: nobody reads it
        else:
            self.count.fill_(count)
        self.runner.run("advance", self._advance_run, tokens, hidden)

    @contextlib.contextmanager
    def state_kept(self, state):
        """``state``'s buffers as they were before the block, whatever it ran: the advance graph's capture and a
        probe's timed replays of it (scripts/step_cost_probe.py) move the drafter's state along for real."""
        tensors = state.buffers()
        saved = [t.clone() for t in tensors]
        try:
            yield
        finally:
            with torch.inference_mode():  # the state's tensors are inference tensors
                for buffer, value in zip(tensors, saved):
                    buffer.copy_(value)

    def window(self, length: int) -> int:
        """The smallest power-of-two window (at least SMALLEST_WINDOW) holding ``length`` slots and one path more:
        the device's length may be ahead of the host's by a path not yet confirmed (``advance_counted``)."""
        return min(power_of_two_at_least(length + self.width, SMALLEST_WINDOW), self.capacity)

    def propose(self, state, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        if tree is not self.tree:  # another topology (the decoder never asks for one; kept correct anyway)
            return self.drafter.propose(state, root, tree)
        window = self.window(state.length)
        key = ("propose", window)
        run = lambda r: self.drafter.propose_static(self.state, r, self.tree, window, levels=self.levels)  # noqa: E731
        if self.runner.graphs and not self.runner.can_run(key):
            compiled = self.levels.inputs if self.levels is not None else None
            with announced(compiled, f"{self.tree.topology.size}-node trees over {window} slots"):
                self.runner.capture(key, run, root.reshape(1))
        return self.runner.run(key, run, root.reshape(1))
