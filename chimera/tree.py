"""Draft-tree shapes as data, and the masks and positions that let one forward pass score a whole tree.

A static topology lists its nodes in breadth-first order. Node 0 is the root (the base model's own next
token); node i > 0 is the ``ranks[i]``-th best candidate that the drafter proposes after ``parents[i]``.
Because every level is contiguous, drafting a level is one batched drafter call.

A dynamic shape (EAGLE-2's idea) fixes only the node count: the drafter grows the tree where it is confident
and writes the tree it chose into the same ``TreeBuffers`` every step, in depth order. Verification and
acceptance read only those tensors, so they serve both kinds (and a captured graph sees each step's tree).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch


@dataclass(frozen=True)
class TreeTopology:
    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self):
        if len(self.parents) != len(self.ranks) or not self.parents or self.parents[0] != -1:
            raise ValueError("a topology needs a root (parent -1) and one rank per node")
        seen = set()
        for i, (p, r) in enumerate(zip(self.parents[1:], self.ranks[1:]), start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come earlier (breadth-first order)")
            if self.depths[p] + 1 < self.depths[i - 1]:
                raise ValueError("nodes must be in breadth-first order")
            if (p, r) in seen or r < 0:
                raise ValueError(f"node {i} repeats rank {r} under parent {p}")
            seen.add((p, r))

    @classmethod
    def from_paths(cls, paths) -> "TreeTopology":
        """Build from rank paths (Medusa-style 'choices'): (0,) is the drafter's top candidate after the root,
        (0, 1) the second candidate after that one. Every prefix of a path must be a path too."""
        paths = sorted({tuple(p) for p in paths if len(p) > 0}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents, ranks = [-1], [0]
        for path in paths:
            if path[:-1] not in index:
                raise ValueError(f"path {path} lacks its prefix {path[:-1]}")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def chain(cls, depth: int) -> "TreeTopology":
        return cls.from_paths([(0,) * k for k in range(1, depth + 1)])

    @cached_property
    def is_chain(self) -> bool:
        """Each node the parent of the next: any accepted path is a prefix of the nodes, in order."""
        return self.parents == tuple(range(-1, len(self.parents) - 1))

    @classmethod
    def full(cls, widths) -> "TreeTopology":
        """Every node at level k has widths[k] children (the top-w candidates)."""
        paths, level = [], [()]
        for width in widths:
            level = [p + (r,) for p in level for r in range(width)]
            paths += level
        return cls.from_paths(paths)

    @classmethod
    def from_profile(cls, profile, size: int) -> "TreeTopology":
        """The ``size``-node tree with the most expected accepted tokens under an acceptance profile
        (``profile[k][r]``: probability that head k+1's rank-r candidate is right, given its parent was).

        A path's value is the product of its steps' probabilities, and a child is never worth more than its
        parent, so taking paths best-first keeps every prefix and is optimal under that independence model.
        """
        import heapq

        heap = [(-profile[0][r], (r,)) for r in range(len(profile[0])) if profile[0][r] > 0]
        heapq.heapify(heap)
        chosen = []
        while heap and len(chosen) < size - 1:
            neg, path = heapq.heappop(heap)
            chosen.append(path)
            if len(path) < len(profile):
                for r, p in enumerate(profile[len(path)]):
                    if p > 0:
                        heapq.heappush(heap, (neg * p, path + (r,)))
        return cls.from_paths(chosen)

    def expected_accepted(self, profile) -> float:
        """Expected tokens per step (tau) of this tree under an acceptance profile, root included."""
        value = [1.0]
        for i in range(1, self.size):
            value.append(value[self.parents[i]] * profile[self.depths[i] - 1][self.ranks[i]])
        return sum(value)

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        depths = [0]
        for p in self.parents[1:]:
            depths.append(depths[p] + 1)
        return tuple(depths)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @cached_property
    def levels(self) -> tuple[range, ...]:
        """Node index range of each depth 0..max_depth."""
        bounds, out = self.depths, []
        for d in range(self.max_depth + 1):
            idx = [i for i, x in enumerate(bounds) if x == d]
            out.append(range(idx[0], idx[-1] + 1))
        return tuple(out)

    def ancestor_matrix(self) -> torch.Tensor:
        """A[i, j] is True when node j is node i or one of its ancestors."""
        n = self.size
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = self.parents[j]
        return anc

    def describe(self) -> str:
        widths = [len(r) for r in self.levels]
        return f"{self.size} nodes, depth {self.max_depth}, level widths {widths}"


@dataclass(frozen=True)
class DynamicTree:
    """A tree of ``size`` nodes up to ``depth`` deep, chosen anew at every step: each level expands the
    ``beam`` likeliest nodes so far (by the drafter's path probability) with their ``beam`` best candidates,
    and the ``size - 1`` likeliest of all candidates, a set closed under parents, join the root."""

    size: int
    depth: int
    beam: int

    def __post_init__(self):
        if self.size < 2 or self.depth < 1 or self.beam < 1:
            raise ValueError("a dynamic tree needs at least 2 nodes, depth 1 and beam 1")
        if self.size - 1 > self.candidates:
            raise ValueError(f"a {self.size}-node tree needs more candidates than depth {self.depth} and beam "
                             f"{self.beam} give ({self.candidates})")

    @property
    def candidates(self) -> int:
        return self.beam + (self.depth - 1) * self.beam * self.beam

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def is_chain(self) -> bool:
        """Never: its nodes' order is chosen anew at every step (TreeTopology.is_chain)."""
        return False

    @property
    def name(self) -> str:
        """What ``get_topology`` reads back as this tree: dynamic-N-BEAM-DEPTH."""
        return f"dynamic-{self.size}-{self.beam}-{self.depth}"

    def describe(self) -> str:
        return f"dynamic, {self.size} nodes, depth {self.depth}, beam {self.beam}"


@dataclass
class TreeBuffers:
    """Device tensors for one tree shape, built once and reused every step (for a dynamic tree, refilled in
    place by the drafter)."""

    topology: TreeTopology | DynamicTree
    depths: torch.Tensor  # (n,) long
    parents: torch.Tensor  # (n,) long, root points at itself
    ancestors: torch.Tensor  # (n, n) bool
    earlier_siblings: torch.Tensor  # (n, n) bool: [i, j] when j shares i's parent and is tried before it

    @classmethod
    def build(cls, topology: TreeTopology | DynamicTree, device) -> "TreeBuffers":
        if isinstance(topology, DynamicTree):  # a chain until the drafter fills it
            return replace(cls.build(TreeTopology.chain(topology.size - 1), device), topology=topology)
        parents = torch.tensor([max(p, 0) for p in topology.parents], device=device)
        return cls(
            topology=topology,
            depths=torch.tensor(topology.depths, device=device),
            parents=parents,
            ancestors=topology.ancestor_matrix().to(device),
            earlier_siblings=earlier_siblings(parents),
        )

    @property
    def dynamic(self) -> bool:
        return isinstance(self.topology, DynamicTree)

    def refill(self, parents: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor,
               siblings: torch.Tensor) -> None:
        """Store a new tree in place (nodes in depth order, root first with parent 0; its masks from
        ``tree_masks``): a captured graph reads these very tensors."""
        self.parents.copy_(parents)
        self.depths.copy_(depths)
        self.ancestors.copy_(ancestors)
        self.earlier_siblings.copy_(siblings)

    def level_children(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the nodes of depth ``level``: the index of each one's parent within the previous level,
        and its rank among that parent's candidates."""
        topo = self.topology
        prev = topo.levels[level - 1]
        nodes = topo.levels[level]
        slots = torch.tensor([topo.parents[i] - prev.start for i in nodes], device=self.depths.device)
        ranks = torch.tensor([topo.ranks[i] for i in nodes], device=self.depths.device)
        return slots, ranks


def tree_masks(parents: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ancestor matrix (each node sees itself) and ``earlier_siblings`` of the tree ``parents`` (nodes in depth
    order, the root its own parent, at most ``max_depth`` deep). Tensor ops only, no host read: capturable."""
    columns = torch.arange(parents.numel(), device=parents.device)
    node = columns
    ancestors = node[:, None] == columns[None, :]
    for _ in range(max_depth):
        node = parents[node]
        ancestors = ancestors | (node[:, None] == columns[None, :])
    return ancestors, earlier_siblings(parents)


def earlier_siblings(parents: torch.Tensor) -> torch.Tensor:
    """[i, j] when non-root nodes i and j share a parent and j comes first (is tried before i)."""
    idx = torch.arange(parents.numel(), device=parents.device)
    same_parent = parents[:, None] == parents[None, :]
    return same_parent & (idx[None, :] < idx[:, None]) & (idx[None, :] > 0) & (idx[:, None] > 0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (q, k) → additive float (1, 1, q, k) mask: 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def tree_attention_mask(prefix_len: int, ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tree nodes see the whole verified prefix and their own ancestors (and themselves)."""
    n = ancestors.shape[0]
    allowed = torch.cat(
        [torch.ones(n, prefix_len, dtype=torch.bool, device=ancestors.device), ancestors], dim=1
    )
    return additive_mask(allowed, dtype)


# Default shapes, from small to large. "default" was chosen by measurement (see docs/benchmarks.md).
TOPOLOGIES = {
    "chain4": TreeTopology.chain(4),
    "small": TreeTopology.from_paths(
        [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0), (0, 0, 0, 0, 0)]
    ),
    "medium": TreeTopology.from_paths(
        [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
         (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 2),
         (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0),
         (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0)]
    ),
    "large": TreeTopology.from_paths(
        [(0,), (1,), (2,), (3,), (4,),
           (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0),
           (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (2, 0, 0),
           (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 0, 2),
           (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0), (0, 0, 1, 0, 0),
           (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0)]
    ),
}
DEFAULT_TOPOLOGY = "medium"  # what "auto" uses for a drafter without an acceptance profile


AUTO_TREE_SIZE = {"cuda": 64, "cpu": 5}  # nodes: verifying is nearly free on a GPU, not on a CPU (docs/benchmarks.md)
# "auto" for drafters that build dynamic trees, per device (docs/benchmarks.md: +7 % tau over the static 64), at most
# 6 levels deep: on an H100 in bfloat16 the shipped drafter's 8 levels gave tau 2.95 at 3.94 ms a step, 6 levels
# tau 2.99 at 3.50 ms (docs/benchmarks.md, session 13; each level drafted costs about 0.2 ms there). Since session 15
# this is where the GPU's calibration starts (gpu_calibration.py), and what runs uncalibrated (calibrate=False)
AUTO_DYNAMIC = {"cuda": "dynamic-64-8-6"}


DYNAMIC_BEAM = 8  # EAGLE-2 expands 10 per level for 7B models; 8 keeps a level's drafting one small batch
# Verifying n nodes holds n x vocabulary logits and an n x context mask; 1024 nodes of a 128k vocabulary are
# 0.5 GB of float32 logits, and no drafter of ours gains anything past 128 nodes (docs/benchmarks.md).
MAX_TREE_NODES = 1024
MAX_BEAM = 64


def tree_number(text: str, what: str, largest: int) -> int:
    """A node count or beam from the command line, refused past ``largest`` before it is ever allocated."""
    from .errors import ChimeraError

    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) > largest:
        raise ChimeraError(f"{what} must be a whole number up to {largest}, got {text[:20]!r}")
    return int(text)


def get_topology(name: str, drafter=None, device=None) -> TreeTopology | DynamicTree:
    """A named topology; a node count ("32") or "auto", built from the drafter's acceptance profile; or a
    dynamic tree, "dynamic-N" (N nodes), "dynamic-N-B" (beam B) or "dynamic-N-B-D" (D levels deep; by default as
    deep as the drafter has heads).

    Without a profile (an untrained or older drafter) a number or "auto" falls back to the named shapes."""
    from .errors import ChimeraError

    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    if name.startswith("dynamic"):
        return _dynamic_tree(name, drafter)
    device_type = getattr(device, "type", device)
    if name == "auto" and device_type in AUTO_DYNAMIC and getattr(drafter, "drafts_dynamic_trees", False):
        return default_dynamic_tree(drafter, device_type)
    if name != "auto" and not (name.isascii() and name.isdigit()):
        raise ChimeraError(f"unknown tree {name[:40]!r}: choose one of {', '.join(TOPOLOGIES)}, auto, a node count, "
                           "or dynamic-N[-BEAM[-DEPTH]]")
    size = (tree_number(name, "a tree's node count", MAX_TREE_NODES) if name != "auto"
            else AUTO_TREE_SIZE.get(device_type, AUTO_TREE_SIZE["cpu"]))
    if size < 2:
        raise ChimeraError(f"a tree needs at least 2 nodes, got {size}")
    profile = getattr(drafter, "acceptance_profile", None)
    if not profile and name != "auto":
        raise ChimeraError(f"--tree {name} builds the tree from the drafter's acceptance profile, which this "
                           f"drafter lacks: choose one of {', '.join(TOPOLOGIES)}")
    if not profile:
        return TOPOLOGIES[DEFAULT_TOPOLOGY]
    heads = getattr(getattr(drafter, "config", None), "num_draft_heads", len(profile))
    return TreeTopology.from_profile(profile[:heads], size)


def default_dynamic_tree(drafter, device_type: str = "cuda") -> DynamicTree:
    """The dynamic tree 'auto' gives ``drafter`` on ``device_type`` before any calibration (AUTO_DYNAMIC), no deeper
    than its heads."""
    return _dynamic_tree(AUTO_DYNAMIC[device_type], drafter, cap_depth=True)


def _dynamic_tree(name: str, drafter, cap_depth: bool = False) -> DynamicTree:
    """``name`` as a dynamic tree for ``drafter``; a depth past the drafter's heads is refused, or with ``cap_depth``
    (the automatic choice) brought down to them."""
    from .errors import ChimeraError

    parts = name.split("-")
    if (len(parts) not in (2, 3, 4) or parts[0] != "dynamic"
            or not all(x.isascii() and x.isdigit() for x in parts[1:])):
        raise ChimeraError(f"unknown tree {name[:40]!r}: a dynamic tree is dynamic-N, dynamic-N-BEAM or "
                           "dynamic-N-BEAM-DEPTH, e.g. dynamic-64")
    require_dynamic_drafter(drafter)
    size = tree_number(parts[1], "a dynamic tree's node count", MAX_TREE_NODES)
    beam = tree_number(parts[2], "a dynamic tree's beam", MAX_BEAM) if len(parts) >= 3 else DYNAMIC_BEAM
    heads = getattr(getattr(drafter, "config", None), "num_draft_heads", 6)
    depth = tree_number(parts[3], "a dynamic tree's depth", MAX_BEAM) if len(parts) == 4 else heads
    if depth > heads and not cap_depth:
        raise ChimeraError(f"--tree {name}: the tree is {depth} deep but the drafter has {heads} heads")
    depth = min(depth, heads)
    try:
        return DynamicTree(size=size, depth=depth, beam=beam)
    except ValueError as e:
        raise ChimeraError(f"--tree {name}: {e}") from None


def require_dynamic_drafter(drafter) -> None:
    """A dynamic tree is built by the drafter as it drafts; refuse one for a drafter that cannot."""
    from .errors import ChimeraError

    if drafter is not None and not getattr(drafter, "drafts_dynamic_trees", False):
        raise ChimeraError(f"a dynamic tree needs a drafter that builds one; this drafter "
                           f"({type(drafter).__name__}) drafts static trees only")
