"""Medusa-1 style heads: the baseline the Chimera paper compares against, on the same frozen base.

Head k reads only the last verified hidden state ``h_n`` and guesses the token k steps past the root:
``lm_head(norm(h_n + R_k(h_n)))`` with ``R_k`` a zero-initialised residual block and the base ``lm_head``
shared and frozen (as our Chimera heads share it, so both drafters cost the same vocabulary matmul).
The heads never see the tokens they drafted, so every node at depth k takes head k's candidates by rank:
one batched matmul drafts the whole tree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..target import vocab_logits
from ..identity import base_identity
from ..tree import TreeBuffers
from . import persist
from .rows import MedusaRows
from .chimera import MAX_DRAFT_HEADS, RMSNorm


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int
    num_draft_heads: int = 6
    rms_norm_eps: float = 1e-6
    base: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.num_draft_heads <= MAX_DRAFT_HEADS:
            raise ValueError(f"num_draft_heads must be in 1..{MAX_DRAFT_HEADS}")
        if self.hidden_size < 1 or self.vocab_size < 1 or self.rms_norm_eps <= 0:
            raise ValueError("hidden_size, vocab_size and rms_norm_eps must be positive")

    @classmethod
    def from_base(cls, model, num_draft_heads: int = 6) -> "MedusaConfig":
        cfg = model.config.get_text_config()
        return cls(hidden_size=cfg.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
                   num_draft_heads=num_draft_heads, rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6) or 1e-6),
                   base=base_identity(model))


class ResBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


@dataclass
class MedusaState:
    last_hidden: torch.Tensor  # (d,) the base's hidden state after the last verified token


class MedusaDrafter(nn.Module):
    per_head_modules = ("blocks",)  # module lists with one entry per draft depth

    def __init__(self, config: MedusaConfig, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self._frozen = {"lm_head": lm_head}  # shared by reference, never saved with the drafter
        self.blocks = nn.ModuleList(ResBlock(config.hidden_size) for _ in range(config.num_draft_heads))
        self.head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.acceptance_profile = None  # measured per head and rank; trees are built from it

    @classmethod
    def for_base(cls, model, num_draft_heads: int = 6, seed: int | None = 0) -> "MedusaDrafter":
        if seed is not None:
            torch.manual_seed(seed)
        drafter = cls(MedusaConfig.from_base(model, num_draft_heads), model.get_output_embeddings())
        weight = model.get_input_embeddings().weight
        return drafter.to(device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def calibrate_head_norm(self, hidden: torch.Tensor) -> None:
        """Start at the base's hidden-state scale: with identity blocks head k then scores like the base."""
        self.head_norm.weight.fill_(float(hidden.float().pow(2).mean(-1).sqrt().mean()))

    def head_logits(self, h: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Logits of heads 1..depth for hidden states h (..., d): a list of (..., V)."""
        lm_head = self._frozen["lm_head"]
        return [lm_head(self.head_norm(block(h.to(self.head_norm.weight.dtype)))) for block in self.blocks[:depth]]

    def forward(self, tokens, hidden, depth, roots=None):
        """Training: the chain rooted at r reads h_{r-1}; head k guesses x_{r+k} (the trainer's convention).
        Returns per-depth logits (B, m, V) and no hidden-state estimates."""
        B, L = tokens.shape
        if roots is None:
            roots = torch.arange(L, device=tokens.device).expand(B, L)
        index = (roots - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        h_last = torch.gather(hidden, 1, index)
        return self.head_logits(h_last, depth), [None] * depth

    # ----- inference (the Drafter protocol) -----------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt_ids: torch.Tensor, hidden: torch.Tensor) -> MedusaState:
        return MedusaState(hidden[-1])

    @torch.inference_mode()
    def advance(self, state: MedusaState, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        state.last_hidden = hidden[-1]

    @torch.inference_mode()
    def propose(self, state: MedusaState, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        plan = _plan(tree)
        depth = tree.topology.max_depth
        z = self.head_norm(torch.stack([b(state.last_hidden.to(self.head_norm.weight.dtype))
                                        for b in self.blocks[:depth]]))
        logits = vocab_logits(z, self._frozen["lm_head"])  # (depth, V): one matmul for the whole tree
        top = logits.topk(plan.width, dim=-1).indices
        return torch.cat([root.reshape(1), top[plan.head, plan.rank]])

    def rows(self, count: int, capacity: int, device) -> MedusaRows:
        """Drafting for the rows of a running batch, all at once (drafters/rows.py)."""
        return MedusaRows(self)

    # ----- persistence --------------------------------------------------------------------------------------

    def save(self, directory, extra_config: dict | None = None, dtype: torch.dtype | None = None) -> None:
        config = {"architecture": "medusa", **asdict(self.config), "acceptance": self.acceptance_profile,
                  **(extra_config or {})}
        persist.save_directory(directory, config, persist.trainable_state(self, dtype))


@dataclass
class _Plan:
    head: torch.Tensor  # (n - 1,) which head drafts each non-root node (its depth - 1)
    rank: torch.Tensor  # (n - 1,) which of that head's candidates
    width: int


_PLANS: dict = {}


def _plan(tree: TreeBuffers) -> _Plan:
    key = (tree.topology, str(tree.depths.device))
    if key not in _PLANS:
        topo = tree.topology
        device = tree.depths.device
        _PLANS[key] = _Plan(head=torch.tensor([d - 1 for d in topo.depths[1:]], device=device),
                            rank=torch.tensor(topo.ranks[1:], device=device), width=max(topo.ranks[1:]) + 1)
    return _PLANS[key]


def load_medusa(path, model, dtype: torch.dtype | None = None) -> MedusaDrafter:
    raw = persist.read_config(path)
    config = persist.build_config(MedusaConfig, raw, path)
    persist.check_base(config.base, model, path)
    persist.check_sizes(config, model, path)
    drafter = MedusaDrafter(config, model.get_output_embeddings())
    persist.load_weights(drafter, path)
    drafter.acceptance_profile = persist.acceptance_profile(raw, config.num_draft_heads)
    weight = model.get_input_embeddings().weight
    return drafter.to(device=weight.device, dtype=dtype or weight.dtype).eval().requires_grad_(False)
