"""Which drafted tokens the base model accepts: greedy matching, or lossless multi-draft rejection sampling.

Both return an ``Accepted``: the path as node indices padded to the tree's depth + 1, its length, and the base's
next token, all device tensors of fixed shapes made by tensor ops only, so the caller syncs with the host once
per step, when it reads them (no data-dependent ``nonzero``, no indexing by a 0-d tensor or assigning a Python
scalar, which read or write through the host: on an H200 they made greedy acceptance wait for the device four
times a step, found with torch.cuda's sync debug mode by scripts/step_profile.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingConfig, target_probs
from .tree import TreeBuffers


@dataclass
class Accepted:
    """One step's outcome. ``path`` (max_depth + 1,) lists the accepted nodes root first; entries from ``length``
    on are 0 (the root), padding that keeps the shape fixed. ``length`` () counts the path's nodes, the root
    included; ``next_token`` () is the base's own token after the path."""

    path: torch.Tensor
    length: torch.Tensor
    next_token: torch.Tensor


def path_to(deepest: torch.Tensor, tree: TreeBuffers) -> Accepted:
    """The root-to-``deepest`` path, padded: its node at depth k is the one ancestor of ``deepest`` at depth k."""
    levels = torch.arange(tree.topology.max_depth + 1, device=tree.depths.device)
    at = deepest.reshape(1)  # indexing by a 0-d tensor would read it on the host: select by a 1-d one instead
    on_level = tree.ancestors.index_select(0, at) & (tree.depths[None, :] == levels[:, None])
    return Accepted(path=on_level.int().argmax(-1), length=tree.depths.index_select(0, at)[0] + 1,
                    next_token=deepest)


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers) -> Accepted:
    """Accept the longest root-to-node path that greedy decoding would have produced.

    Node i is correct when its token is the argmax of its parent's logits; a path is accepted when all its
    nodes are. Siblings hold distinct tokens, so at most one child of a node is correct and the deepest
    accepted node names a unique path. Returns (path node indices in order, the base's next token).
    All tensor ops: the caller syncs once when it reads the result.
    """
    if tree.topology.size == 1:  # plain decoding: the path is the root, the next token the argmax (2 kernels, not 12)
        return Accepted(path=tree.depths, length=tree.depths[0] + 1, next_token=logits[0].argmax())
    pred = logits.argmax(-1)
    correct = tokens == pred[tree.parents]
    correct[:1].fill_(True)  # the root is the base's own token (``correct[0] = True`` copies from the host: a sync)
    accepted = ~(tree.ancestors & ~correct[None, :]).any(-1)
    deepest = torch.where(accepted, tree.depths, -1).argmax()
    result = path_to(deepest, tree)
    result.next_token = pred.index_select(0, deepest.reshape(1))[0]
    return result


def greedy_accept_chains(chains: torch.Tensor, logits: torch.Tensor, drafted: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``greedy_accept`` for a chain per row (a running batch's drafted step, batch.py): ``chains`` (rows, depth + 1)
    the newest token then the drafts, ``logits`` (rows, depth + 1, vocab) the base's after each. Returns how many
    drafts each row accepts, the longest run equal to the base's argmax before them (none in a row not ``drafted``),
    and the base's token after them, (rows,) each. A chain's accepted nodes are a prefix of it, in order."""
    predicted = logits.argmax(-1)
    accepted = (chains[:, 1:] == predicted[:, :-1]).long().cumprod(-1).sum(-1) * drafted
    return accepted, predicted.gather(1, accepted[:, None])[:, 0]


def draft_accept_probs(tokens: torch.Tensor, probs: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """The probability that node i is accepted once its parent is accepted and its earlier siblings rejected.

    A drafted token is a point mass, so rejection sampling accepts it with its share of the parent's residual:
    p(t_i) / (1 - mass of the earlier siblings' tokens), each rejection having removed one token from p.
    A token that repeats an earlier sibling's has probability 0 in the residual (drafters should not do that).
    """
    before = tree.earlier_siblings
    q = probs[tree.parents, tokens]
    repeated = (before & (tokens[:, None] == tokens[None, :])).any(-1)
    q = torch.where(repeated, 0.0, q)
    tried = (before.to(q.dtype) * q[None, :]).sum(-1)
    rest = (1.0 - tried - q).clamp_min(0.0)  # the mass still untried after node i, were it rejected
    return torch.where(q > 0, q / (q + rest), 0.0)


def accepted_path(accept: torch.Tensor, tree: TreeBuffers, generator: torch.Generator) -> torch.Tensor:
    """Try every node's children in order, accepting child i with probability ``accept[i]``: the first accepted
    child is taken. One uniform per non-root node, all drawn at once (the draws of untried nodes are simply
    unused); the path is the chain of first-accepted children. Returns its last node."""
    u = torch.rand(accept.numel() - 1, generator=generator, device=accept.device, dtype=accept.dtype)
    accepted = torch.cat([accept.new_ones(1, dtype=torch.bool), u < accept[1:]])
    first = accepted & ~(tree.earlier_siblings & accepted[None, :]).any(-1)
    on_path = ~(tree.ancestors & ~first[None, :]).any(-1)
    return torch.where(on_path, tree.depths, -1).argmax()


def residual(probs: torch.Tensor, tokens: torch.Tensor, tried: torch.Tensor) -> torch.Tensor:
    """``probs`` (vocab,) with the tokens of the ``tried`` nodes removed (unnormalised: multinomial normalises).

    Falls back to ``probs`` if nothing is left, which exact arithmetic never allows (the last untried token
    is accepted with probability 1) but float rounding could, with probability ~1e-7."""
    removed = torch.zeros_like(probs).index_add_(0, tokens, tried.to(probs.dtype)) > 0
    left = probs.masked_fill(removed, 0.0)
    return torch.where(left.sum() > 0, left, probs)


def sample_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers, config: SamplingConfig,
                  generator: torch.Generator) -> Accepted:
    """Multi-draft rejection sampling over the tree (SpecInfer / EAGLE style, point-mass drafts).

    From the root, try the children of the current node in order: accept child c with probability
    p(c) / (residual mass), else remove c from p. On acceptance move to c; when every child is rejected
    (or the node is a leaf) draw the next token from what is left of p. Every emitted token is then
    distributed exactly as p, the base's processed distribution (proof: docs/sampling.md).
    """
    probs = target_probs(logits, config)
    deepest = accepted_path(draft_accept_probs(tokens, probs, tree), tree, generator)
    children = (tree.parents == deepest) & (tree.depths > 0)
    result = path_to(deepest, tree)
    remaining = residual(probs.index_select(0, deepest.reshape(1))[0], tokens, children)
    result.next_token = torch.multinomial(remaining, 1, generator=generator)[0]
    return result
