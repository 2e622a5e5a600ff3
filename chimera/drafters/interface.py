"""The interface every drafter implements; the decoding loop knows nothing else about drafters."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..tree import TreeBuffers


class Drafter(Protocol):
    def start(self, prompt_ids: torch.Tensor, hidden: torch.Tensor) -> Any:
        """Begin a sequence: the prompt's token ids (L,) and the base's final hidden states there (L, d).
        Returns the drafter's per-sequence state."""

    def propose(self, state: Any, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        """Fill the tree: returns the token of every node (n,), node 0 being ``root`` (a 1-element tensor)."""

    def advance(self, state: Any, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """The base verified ``tokens`` (a,) with final hidden states (a, d): extend the state with them."""
