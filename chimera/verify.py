"""Which drafted tokens the base model accepts."""

from __future__ import annotations

import torch

from .tree import TreeBuffers


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest root-to-node path that greedy decoding would have produced.

    Node i is correct when its token is the argmax of its parent's logits; a path is accepted when all its
    nodes are. Siblings hold distinct tokens, so at most one child of a node is correct and the deepest
    accepted node names a unique path. Returns (path node indices in order, the base's next token).
    All tensor ops: the caller syncs once when it reads the result.
    """
    pred = logits.argmax(-1)
    correct = tokens == pred[tree.parents]
    correct[0] = True  # the root is the base's own token
    accepted = ~(tree.ancestors & ~correct[None, :]).any(-1)
    deepest = torch.where(accepted, tree.depths, -1).argmax()
    path = tree.ancestors[deepest].nonzero().squeeze(-1)  # BFS order is depth order
    return path, pred[deepest]
