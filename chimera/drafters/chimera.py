"""The Chimera drafter: trigram encoder, one full-context layer over the base's hidden states, residual heads.

Notation (DESIGN.md): ``h_t`` is the base's final-norm hidden state after token ``x_t``; ``E`` its frozen
embeddings, ``W`` its frozen ``lm_head``.

- Trigram encoder: ``g_t = W2 act(W1 [E x_{t-2}; E x_{t-1}; E x_t] + b1)``. ``W1`` splits into three
  blocks, so at inference ``W1 [..]`` is three rows looked up in precomputed ``E W1_i^T`` tables.
- Full-context layer: one pre-norm decoder layer. A verified position ``t`` enters it as
  ``fuse([h_t; g_t])``, a draft position as ``g_t`` alone (its ``h`` is unknown). Draft positions attend to
  the verified prefix and to their own tree ancestors; the output ``u_t`` estimates ``h_t``. With
  ``feature_layers`` (since session 18; EAGLE-3's low, middle and high features) a verified position enters as
  ``fuse([a_t; b_t; ...; h_t; g_t])``, the base's states after those layers before its final one, all read from
  the forward that verified ``x_t`` (target.feature_states); the heads still read ``h``.
- Residual heads: head k scores the token after a depth-(k-1) node as ``lm_head(norm(u + R_k([h_n; u])))``
  with ``h_n`` the last verified hidden state and ``R_k``'s last layer zero-initialised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled import Compiled
from ..target import vocab_logits, weight_head
from ..cpu_linear import PackedLinear
from ..errors import ChimeraError
from ..identity import base_identity
from ..tree import TreeBuffers, tree_masks
from . import persist
from .rows import ChimeraRows


MAX_DRAFT_HEADS = 64
MAX_FEATURE_LAYERS = 8
FEATURE_LAYERS_RULE = f"at most {MAX_FEATURE_LAYERS} distinct layer numbers >= 0"


def feature_layers_valid(layers) -> bool:
    """Whether ``layers`` can be a drafter's feature layers (FEATURE_LAYERS_RULE; the base's own count is checked
    against it apart, persist.check_feature_layers): the config's rule and the command line's alike."""
    return (len(layers) <= MAX_FEATURE_LAYERS and len(set(layers)) == len(layers)
            and all(isinstance(i, int) and i >= 0 for i in layers))


@dataclass
class ChimeraConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    num_draft_heads: int = 6
    untied_heads: bool = False
    # the base's hidden states read beside its final one, by index into transformers' ``hidden_states`` (0: the
    # embeddings, i: after layer i), fused at the drafter's input (EAGLE-3's low, middle and high features); none:
    # the final state alone, as every drafter saved before session 18
    feature_layers: list[int] = field(default_factory=list)
    base: dict = field(default_factory=dict)  # identity.base_identity of the base it was built for

    def __post_init__(self):
        """Bounds that keep a forged config from allocating what it says (sizes are checked against the base
        on loading, persist.check_sizes)."""
        checks = [(1 <= self.num_draft_heads <= MAX_DRAFT_HEADS, f"num_draft_heads must be in 1..{MAX_DRAFT_HEADS}"),
                  (self.hidden_size >= 1 and self.vocab_size >= 1, "hidden_size and vocab_size must be positive"),
                  (1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
                   "num_kv_heads must divide num_heads"),
                  (1 <= self.num_heads * self.head_dim <= 4 * self.hidden_size,
                   "num_heads * head_dim must be in 1..4 * hidden_size"),
                  (1 <= self.intermediate_size <= 16 * self.hidden_size,
                   "intermediate_size must be in 1..16 * hidden_size"),
                  (self.rms_norm_eps > 0 and self.rope_theta > 0, "rms_norm_eps and rope_theta must be positive"),
                  (feature_layers_valid(self.feature_layers), "feature_layers must be " + FEATURE_LAYERS_RULE)]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_base(cls, model, num_draft_heads: int = 6, untied_heads: bool = False,
                  identity: bool = True, feature_layers=()) -> "ChimeraConfig":
        """Sizes from the base's config; ``identity`` False leaves out the base's identity, which reads its
        weights (for a base on the meta device, sized but not materialised: scripts/drafter_memory.py)."""
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        return cls(
            hidden_size=cfg.hidden_size,
            vocab_size=model.get_output_embeddings().weight.shape[0],
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6) or 1e-6),
            rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)) or 10000.0),
            num_draft_heads=num_draft_heads,
            untied_heads=untied_heads,
            feature_layers=list(feature_layers),
            base=base_identity(model) if identity else {},
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


_INVERSE_FREQUENCIES: dict = {}


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin) of every position's angles, (..., seq, head_dim / 2): computed once per drafting level
    and shared by its queries and keys (each kernel counts when drafting replays a few hundred of them)."""
    half = head_dim // 2
    key = (half, theta, str(positions.device))
    compiling = torch.compiler.is_compiling()  # compiled code computes them: a global dict's contents would be guarded
    frequencies = None if compiling else _INVERSE_FREQUENCIES.get(key)
    if frequencies is None:
        frequencies = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
        if not compiling:
            _INVERSE_FREQUENCIES[key] = frequencies
    angles = positions.to(torch.float32)[..., None] * frequencies
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rotation) -> torch.Tensor:
    """Rotary embedding, half-split convention: x (..., seq, head_dim) turned by ``rotary``'s (cos, sin)."""
    cos, sin = rotation
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class FullContextLayer(nn.Module):
    """A pre-norm decoder layer whose keys/values can come from elsewhere (the verified prefix)."""

    def __init__(self, c: ChimeraConfig):
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.head_dim
        self.input_norm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.post_norm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)

    def rotation(self, positions: torch.Tensor, dtype: torch.dtype):
        """Rotary (cos, sin) for ``positions`` (..., s), shaped to broadcast over the heads."""
        return rotary(positions[..., None, :], self.c.head_dim, self.c.rope_theta, dtype)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor, rotation=None):
        """x (..., s, d) → keys, values (..., kv_heads, s, head_dim), keys rotated to their positions."""
        c = self.c
        h = self.input_norm(x)
        k = self.k_proj(h).unflatten(-1, (c.num_kv_heads, c.head_dim)).transpose(-3, -2)
        v = self.v_proj(h).unflatten(-1, (c.num_kv_heads, c.head_dim)).transpose(-3, -2)
        return apply_rotary(k, rotation or self.rotation(positions, k.dtype)), v

    def queries(self, x: torch.Tensor, positions: torch.Tensor, rotation=None):
        """x (..., s, d) → (..., kv_heads, group, s, head_dim), grouped for GQA."""
        c = self.c
        q = self.q_proj(self.input_norm(x)).unflatten(-1, (c.num_heads, c.head_dim)).transpose(-3, -2)
        q = apply_rotary(q, rotation or self.rotation(positions, q.dtype))
        return q.unflatten(-3, (c.num_kv_heads, c.num_heads // c.num_kv_heads))

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn (..., kv_heads, group, s, head_dim) → layer output (..., s, d): residuals and the MLP."""
        attn = attn.flatten(-4, -3).transpose(-3, -2).flatten(-2)
        x = x + self.o_proj(attn)
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ResidualHead(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * d, d)
        self.fc2 = nn.Linear(d, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h_last, u):
        return u + self.fc2(F.silu(self.fc1(torch.cat([h_last.expand_as(u), u], dim=-1))))


@dataclass
class DraftState:
    """Per-sequence drafting state: the layer's KV over the verified prefix, the last two verified tokens
    (for the root's trigram) and the last verified hidden state (for the residual heads)."""

    keys: torch.Tensor  # (kv_heads, capacity, head_dim)
    values: torch.Tensor
    length: int
    history: torch.Tensor  # (2,) last two verified tokens, pad id where the sequence is shorter
    last_hidden: torch.Tensor  # (d,)
    length_on_device: torch.Tensor  # () the same length, for drafting without reading it on the host

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The tensors a static advance writes in place (all but the host's ``length``)."""
        return self.keys, self.values, self.history, self.last_hidden, self.length_on_device


class DraftLevels(NamedTuple):
    """How drafting runs its parts: the functions below as they are (``ChimeraDrafter.eager_levels``) or through
    torch.compile (``ChimeraDrafter.compiled_levels``). The vocabulary projection, its log-softmax and top-k run op by
    op in both (see ``compiled_levels``)."""

    inputs: Callable  # ChimeraDrafter.level_inputs: a level's trigram encodings, keys, values and queries
    output: Callable  # ChimeraDrafter.level_output: their attention, the layer's rest, the head
    expand: Callable  # expand_beam: a dynamic tree's children scored and the next level's beam chosen
    choose: Callable  # choose_tree: a dynamic tree of the best candidates, with its masks


class Beam(NamedTuple):
    """The nodes one level of a dynamic tree drafts through (queries): their tokens, the token before each and the
    one before that (for the trigram), path scores, places in the candidate pool (-1: the root) and which queried
    nodes each one sees (itself and its ancestors), one row each."""

    token: torch.Tensor
    last: torch.Tensor
    before: torch.Tensor
    score: torch.Tensor
    pool_index: torch.Tensor
    visible: torch.Tensor  # (nodes, all queried nodes) bool


class ChimeraDrafter(nn.Module):
    drafts_dynamic_trees = True  # it drafts level by level on real tree paths, so it can pick the tree as it goes
    per_head_modules = ("heads", "head_lm")  # module lists with one entry per draft depth

    def __init__(self, config: ChimeraConfig, embeddings: nn.Module, lm_head: nn.Module):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        # frozen base pieces, shared by reference and never saved with the drafter
        self._frozen = {"embed": embeddings, "lm_head": lm_head}
        self.trigram_in = nn.Linear(3 * d, d)
        self.trigram_out = nn.Linear(d, d)
        self.fuse = nn.Linear((len(c.feature_layers) + 2) * d, d)  # the base's states (final last) and g
        self.layer = FullContextLayer(c)
        self.heads = nn.ModuleList(ResidualHead(d) for _ in range(c.num_draft_heads))
        self.head_norm = RMSNorm(d, c.rms_norm_eps)
        self.head_lm = None
        if c.untied_heads:
            self.head_lm = nn.ModuleList(nn.Linear(d, c.vocab_size, bias=False) for _ in range(c.num_draft_heads))
            for head in self.head_lm:
                head.weight.data.copy_(lm_head.weight.data)
        self._tables = None
        self.use_tables = True  # trigram_lookup through the tables (prepare_inference chooses by device)
        self.acceptance_profile = None  # measured per head and rank; trees are built from it
        self.acceptance_odds = None  # and its tables by device (odds_at), which the setter resets
        self._tables_version = None
        self.token_counts = None  # how often the base writes each token (token_counts.safetensors), if known
        self.draft_vocab = None  # token ids the heads score when drafting; None: the whole vocabulary
        self._draft_heads = None  # the vocabulary projection onto those ids (callables), per head if untied

    @classmethod
    def for_base(cls, model, num_draft_heads: int = 6, untied_heads: bool = False, seed: int | None = 0,
                 feature_layers=()):
        """A fresh drafter sized from the base model's config (random weights), reading the base's hidden states
        after ``feature_layers`` beside its final one."""
        if seed is not None:
            torch.manual_seed(seed)
        persist.check_feature_layers(feature_layers, model, "a drafter")
        config = ChimeraConfig.from_base(model, num_draft_heads, untied_heads, feature_layers=feature_layers)
        drafter = cls(config, model.get_input_embeddings(), model.get_output_embeddings())
        weight = model.get_input_embeddings().weight
        return drafter.to(device=weight.device, dtype=weight.dtype)

    def forward(self, tokens, hidden, depth, roots=None):
        """Training entry point (what DDP wraps): the unrolled chains."""
        return self.unrolled_forward(tokens, hidden, depth, roots)

    @torch.no_grad()
    def calibrate_head_norm(self, hidden: torch.Tensor) -> None:
        """Start the head norm at the scale of the base's hidden states, so that with zero-initialised
        residual heads a perfect estimate u = h scores tokens as the base does, at the base's temperature."""
        rms = self.final(hidden).float().pow(2).mean(-1).sqrt().mean()
        self.head_norm.weight.fill_(float(rms))

    # ----- pieces shared by training and inference -------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return self.config.vocab_size  # an extra all-zero embedding row for positions before the start

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Base embeddings, with the pad id (one past the vocabulary) mapped to zeros."""
        weight = self._frozen["embed"].weight
        is_pad = tokens == self.pad_id
        return F.embedding(tokens.masked_fill(is_pad, 0), weight).masked_fill(is_pad[..., None], 0)

    def trigram(self, t0, t1, t2) -> torch.Tensor:
        """g for token triples (x_{t-2}, x_{t-1}, x_t), by direct computation (training)."""
        x = torch.cat([self.embed(t0), self.embed(t1), self.embed(t2)], dim=-1)
        return self.trigram_out(F.silu(self.trigram_in(x)))

    def trigram_tables(self) -> torch.Tensor:
        """(3, vocab + 1, d): row i of table j is E x_i · W1_j^T; recomputed only when the weights change."""
        if torch.compiler.is_compiling() and self._tables is not None:  # a weight's version counter does not trace;
            return self._tables  # compiled drafting runs after prepare_inference, its weights frozen
        version = self.trigram_in.weight._version
        if self._tables is None or self._tables_version != version or self._tables.device != self.trigram_in.weight.device:
            with torch.no_grad():
                d = self.config.hidden_size
                emb = self.embed(torch.arange(self.pad_id + 1, device=self.trigram_in.weight.device))
                w = self.trigram_in.weight.view(d, 3, d)
                self._tables = torch.stack([emb @ w[:, j].T for j in range(3)])
            self._tables_version = version
        return self._tables

    def prepare_inference(self) -> None:
        """Choose how drafting computes the trigram encoding, once, by device. On a CPU through the tables (3 x
        vocabulary x hidden elements): a level of 6 nodes costs 0.16 ms there against 0.40 ms computed directly
        (the default model, 2 cores; scripts/drafter_memory.py --time), for 340 MB of float32 beside its 538 MB of
        weights. On a GPU directly: drafting there is bound by kernel launches, not arithmetic (a draft vocabulary a
        sixth of the full one did not make it faster, docs/benchmarks.md), and the tables grow with the vocabulary
        (3.2 GB in bfloat16 for a Llama 3 8B, a fifth of its weights)."""
        self.use_tables = self.trigram_in.weight.device.type == "cpu"
        if self.use_tables:
            self.trigram_tables()
        else:
            self._tables = None

    def trigram_lookup(self, t0, t1, t2) -> torch.Tensor:
        """g for token triples at draft time: through the precomputed tables (no embedding matmul), or directly
        where ``prepare_inference`` chose to keep no tables."""
        if not self.use_tables:
            return self.trigram(t0, t1, t2)
        tables = self.trigram_tables()
        pre = tables[0][t0] + tables[1][t1] + tables[2][t2] + self.trigram_in.bias
        return self.trigram_out(F.silu(pre))

    def verified_input(self, hidden, g):
        return self.fuse(torch.cat([hidden, g], dim=-1))

    def verified_keys_values(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """The layer's keys and values of verified tokens at inference: ``tokens`` (..., P + 2) the two tokens before
        them then the P themselves, ``hidden`` (..., P, features) the base's hidden states there, at ``positions``
        (..., P). One sequence's state (``advance``) and a running batch's rows (drafters/rows.py) alike."""
        g = self.trigram_lookup(tokens[..., :-2], tokens[..., 1:-1], tokens[..., 2:])
        return self.layer.keys_values(self.verified_input(hidden.to(g.dtype), g), positions)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The base's hidden states a verifier returns for this drafter beside the final one (target.feature_states)."""
        return tuple(self.config.feature_layers)

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's final hidden state (what its vocabulary head reads) in what a verifier returned, which ends
        with it."""
        return hidden[..., -self.config.hidden_size:]

    def head_state(self, k: int, h_last, u) -> torch.Tensor:
        """What head k (1-based: the token k steps after the last verified one) projects onto the vocabulary: from
        the base's final state before the chain (``h_last``, or all its features, the final last)."""
        return self.head_norm(self.heads[k - 1](self.final(h_last), u))

    def head_logits(self, k: int, h_last, u) -> torch.Tensor:
        """Logits of head k over the whole vocabulary."""
        return self.state_logits(k, self.head_state(k, h_last, u))

    def state_logits(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """Head k's ``head_state`` projected onto the whole vocabulary."""
        return vocab_logits(state, self.head_lm[k - 1] if self.head_lm is not None else self._frozen["lm_head"])

    def use_draft_vocabulary(self, size: int | None, route: str | None = None) -> None:
        """Draft over only the ``size`` tokens the base writes most often (FR-Spec), or over the whole vocabulary
        (None). On a CPU the vocabulary projection is most of a drafting level's cost; a token outside the set
        only goes missing from the tree, so the output is unchanged. ``route``: how its rows are projected
        (target.HEAD_ROUTES, the base head's as calibrated; on an Intel Xeon ``linear`` took 0.39-0.43 ms for 4,096
        rows where ``few_rows``, the default, took 0.59-0.69: scripts/cpu_tree_costs.py); None: target.weight_logits's
        default."""
        if size is None or size >= self.config.vocab_size:
            self.draft_vocab = self._draft_heads = None
            return
        if self.token_counts is None:
            raise ChimeraError("this drafter has no token counts (token_counts.safetensors), which a draft "
                               "vocabulary is chosen from: use the full vocabulary")
        heads = list(self.head_lm) if self.head_lm is not None else [self._frozen["lm_head"]]
        ids = self.token_counts.argsort(descending=True, stable=True)[:size].to(heads[0].weight.device)
        rows = [head.weight.detach()[ids].contiguous() for head in heads]
        if route is None and isinstance(heads[0], PackedLinear):  # heads packed for this CPU: their rows likewise
            route = "packed"
        self._draft_heads = [weight_head(w, route) for w in rows]
        self.draft_vocab = ids

    def draft_logits(self, k: int, state: torch.Tensor):
        """Head k's logits for drafting from its ``head_state`` and the token id of each column (None: column i is
        token i)."""
        if self.draft_vocab is None:
            return self.state_logits(k, state), None
        return self._draft_heads[k - 1 if self.head_lm is not None else 0](state), self.draft_vocab

    def level_inputs(self, before: torch.Tensor, last: torch.Tensor, token: torch.Tensor, positions: torch.Tensor):
        """A drafting level's n nodes into the layer: their trigram encodings g (n, d), from the two tokens before
        each node and its own, and the layer's keys and values (kv_heads, n, head_dim) and grouped queries at
        ``positions`` (n,)."""
        g = self.trigram_lookup(before, last, token)
        rotation = self.layer.rotation(positions, g.dtype)
        k, v = self.layer.keys_values(g, positions, rotation)
        return g, k, v, self.layer.queries(g, positions, rotation)

    def level_output(self, depth: int, h_last: torch.Tensor, g: torch.Tensor, q: torch.Tensor, prefix_k, prefix_v,
                     draft_k, draft_v, draft_allowed, prefix_visible) -> torch.Tensor:
        """A level's nodes through the rest of the layer (their attention over the verified prefix and the draft
        nodes they may see, ``_attend``), head ``depth`` and the head norm: what the vocabulary projection scores
        for the tokens ``depth`` after the last verified one."""
        attn = _attend(q, prefix_k, prefix_v, draft_k, draft_v, draft_allowed, prefix_visible)
        return self.head_state(depth, h_last, self.layer.finish(g, attn))

    def eager_levels(self) -> DraftLevels:
        return DraftLevels(self.level_inputs, self.level_output, expand_beam, choose_tree)

    def compiled_levels(self, backend: str = "inductor", parts=DraftLevels._fields) -> DraftLevels:
        """``eager_levels`` with the named ``parts`` through torch.compile (inductor fuses the norms, rotary, the
        MLP, the attention's masking and softmax, and the bookkeeping of the candidates' indices), for
        ``propose_static(levels=...)``. The vocabulary projection, its log-softmax and top-k stay op by op:
        compiled, inductor splits each reduction over the vocabulary into many kernels, and the whole drafting
        function compiled made drafting 10-12x slower on an H200 (docs/benchmarks.md, session 9). Measured there
        (default model, bfloat16, 64-node trees; scripts/step_anatomy.py): the layer and head alone compiled took
        drafting from 3.19 to 2.09 ms a step, 1290 to 754 kernels (session 12); with the attention and the choice of
        candidates compiled too, 444 kernels and 1.82 ms on an H100, against 579 and 2.08 ms with the choice op by op
        (docs/benchmarks.md, session 13)."""
        key = (backend, tuple(parts))  # one per drafter, so that every decoder drafting with it shares what compiled
        cache = self.__dict__.setdefault("_compiled_levels", {})
        if key not in cache:
            eager = self.eager_levels()
            cache[key] = DraftLevels(*(Compiled(function, "the drafter's levels", backend) if name in parts
                                       else function for name, function in zip(DraftLevels._fields, eager)))
        return cache[key]

    def candidates(self, depth: int, state: torch.Tensor, k: int):
        """Head ``depth``'s ``k`` likeliest tokens for each row of ``state`` (a level's ``level_output``), with their
        log-probabilities in float32, best first."""
        logits, column_ids = self.draft_logits(depth, state)
        logp, columns = top_k(logits.log_softmax(-1, dtype=torch.float32), k)
        return logp, columns if column_ids is None else column_ids[columns]

    @property
    def acceptance_odds(self) -> list[tuple[float, float]] | None:
        """Per head (slope, intercept): the log-odds that a candidate is the base's token, given the path above it was
        right, as a line in the log-odds of the head's probability; a dynamic tree scores its paths by it (None: by
        the heads' probabilities as they are)."""
        return self._acceptance_odds

    @acceptance_odds.setter
    def acceptance_odds(self, lines) -> None:
        self._acceptance_odds = None if lines is None else [tuple(line) for line in lines]
        self._odds_tables = {}  # device -> the lines as a (heads, 2) tensor there

    def odds_at(self, depth: int, device) -> torch.Tensor | None:
        """Head ``depth``'s line of ``acceptance_odds`` as a (slope, intercept) tensor on ``device`` (made there once,
        so a drafting step, captured or not, reads it without a copy from the host), or None where none was measured."""
        if self._acceptance_odds is None or depth > len(self._acceptance_odds):
            return None
        table = self._odds_tables.get(device)
        if table is None:
            table = self._odds_tables[device] = torch.tensor(self._acceptance_odds, dtype=torch.float32, device=device)
        return table[depth - 1]

    # ----- inference ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt_ids: torch.Tensor, hidden: torch.Tensor, capacity: int | None = None,
              reuse: DraftState | None = None) -> DraftState:
        """A fresh state for a prompt. ``capacity`` fixes the KV buffers' size (a state that never grows keeps
        its tensors, which a captured CUDA graph needs); ``reuse`` refills an existing state in place."""
        c = self.config
        if reuse is not None:
            state = reuse
            state.length = 0
            state.history.fill_(self.pad_id)
        else:
            capacity = capacity or max(256, 2 * prompt_ids.numel())
            # zeros, not empty: attention weighs unused slots by 0, and 0 times garbage that happens to be
            # inf or NaN is NaN
            keys = hidden.new_zeros(c.num_kv_heads, capacity, c.head_dim)
            pad = torch.full((2,), self.pad_id, device=prompt_ids.device, dtype=torch.long)
            state = DraftState(keys, torch.zeros_like(keys), 0, pad, hidden[-1].to(self.fuse.weight.dtype).clone(),
                               torch.zeros((), dtype=torch.long, device=prompt_ids.device))
        self.advance(state, prompt_ids, hidden)
        return state

    @torch.inference_mode()
    def advance(self, state: DraftState, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        n = tokens.numel()
        ext = torch.cat([state.history, tokens])
        positions = torch.arange(state.length, state.length + n, device=tokens.device)
        k, v = self.verified_keys_values(ext, hidden, positions)
        if state.length + n > state.keys.shape[1]:
            grow = max(state.keys.shape[1], n)
            more = state.keys.new_zeros(state.keys.shape[0], grow, state.keys.shape[2])
            state.keys = torch.cat([state.keys, more], 1)
            state.values = torch.cat([state.values, torch.zeros_like(more)], 1)
        state.keys[:, state.length:state.length + n] = k
        state.values[:, state.length:state.length + n] = v
        state.length += n
        state.length_on_device.fill_(state.length)
        state.history.copy_(ext[-2:])  # in place: a captured drafting graph reads these very tensors
        state.last_hidden.copy_(hidden[-1])

    @torch.inference_mode()
    def advance_static(self, state: DraftState, tokens: torch.Tensor, hidden: torch.Tensor,
                       count: torch.Tensor) -> None:
        """``advance`` by the first ``count`` (a device scalar) of ``tokens`` (P,) and ``hidden`` (P, d), with P
        fixed and no host read, so that a CUDA graph can replay it. Entries past ``count`` are written to KV
        slots past the new length, which attention masks and the next step overwrites. The caller keeps
        ``state.length`` (the host's copy) and guarantees room for P slots."""
        n = tokens.numel()
        ext = torch.cat([state.history, tokens])
        slots = state.length_on_device + torch.arange(n, device=tokens.device)
        k, v = self.verified_keys_values(ext, hidden, slots)
        state.keys.index_copy_(1, slots, k)
        state.values.index_copy_(1, slots, v)
        state.history.copy_(ext.index_select(0, count + torch.arange(2, device=tokens.device)))
        state.last_hidden.copy_(hidden.index_select(0, (count - 1).reshape(1))[0])
        state.length_on_device.add_(count)

    @torch.inference_mode()
    def propose(self, state: DraftState, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        return self._propose(state, root, tree, state.keys[:, : state.length], state.values[:, : state.length],
                             None, state.length)

    @torch.inference_mode()
    def propose_static(self, state: DraftState, root: torch.Tensor, tree: TreeBuffers,
                       window: int | None = None, levels: DraftLevels | None = None) -> torch.Tensor:
        """``propose`` with every shape fixed and no host read: attends over the first ``window`` KV slots
        (all of them by default) with the unused ones masked, so one CUDA graph per window size can replay
        it at every step while the prefix fits (drafters/graphs.py). ``levels``: how each level's layer and head
        run (``compiled_levels``); by default op by op."""
        window = window or state.keys.shape[1]
        visible = torch.arange(window, device=state.keys.device) < state.length_on_device
        return self._propose(state, root, tree, state.keys[:, :window], state.values[:, :window], visible,
                             state.length_on_device, levels)

    def _propose(self, state, root, tree, prefix_k, prefix_v, prefix_visible, offset, levels=None) -> torch.Tensor:
        levels = levels or self.eager_levels()
        if tree.dynamic:
            return self._propose_dynamic(state, root, tree, prefix_k, prefix_v, prefix_visible, offset, levels)
        topo = tree.topology  # SpeculativeDecoder checked that the heads cover its depth
        plan = _tree_plan(tree)
        tokens = root.new_empty(topo.size)
        tokens[0] = root[0]
        ext = torch.cat([state.history, tokens])  # ext[i + 2] is node i
        n = topo.size
        draft_k = state.keys.new_empty(self.config.num_kv_heads, n, self.config.head_dim)
        draft_v = torch.empty_like(draft_k)
        for level in range(topo.max_depth):
            nodes = topo.levels[level]
            lo, hi = nodes.start, nodes.stop
            idx = plan.trigram_index[lo:hi]
            ext[2:] = tokens
            g, k, v, q = levels.inputs(ext[idx[:, 0]], ext[idx[:, 1]], ext[idx[:, 2]], offset + tree.depths[lo:hi])
            draft_k[:, lo:hi], draft_v[:, lo:hi] = k, v
            head_state = levels.output(level + 1, state.last_hidden, g, q, prefix_k, prefix_v, draft_k[:, :hi],
                                       draft_v[:, :hi], tree.ancestors[lo:hi, :hi], prefix_visible)
            logits, column_ids = self.draft_logits(level + 1, head_state)
            top = top_k(logits, plan.width[level + 1])[1]
            top = top if column_ids is None else column_ids[top]
            slots, ranks = plan.children[level + 1]
            tokens[topo.levels[level + 1].start: topo.levels[level + 1].stop] = top[slots, ranks]
        return tokens

    def _propose_dynamic(self, state, root, tree, prefix_k, prefix_v, prefix_visible, offset, levels) -> torch.Tensor:
        """Grow the tree where the drafter is confident (EAGLE-2): level by level, the ``beam`` candidates with
        the highest path log-probability are drafted through (queried) and each proposes its ``beam`` best
        children (``expand_beam``); then the ``size - 1`` best candidates of all levels form the tree
        (``choose_tree``), written into ``tree``. Fixed shapes, no host reads: capturable."""
        shape, c = tree.topology, self.config
        beam, depth = shape.beam, shape.depth
        device = root.device
        queried = 1 + (depth - 1) * beam  # the root, then `beam` nodes at each level but the last
        draft_k = state.keys.new_empty(c.num_kv_heads, queried, c.head_dim)
        draft_v = torch.empty_like(draft_k)
        pool = []  # per level: the candidates' path scores, tokens and parents' pool indices
        seen = (torch.arange(queried, device=device) == 0)[None]  # the root sees itself; no host scalar: capturable
        nodes = Beam(root.reshape(1), state.history[1:], state.history[:1], torch.zeros(1, device=device),
                     torch.full((1,), -1, dtype=torch.long, device=device), seen)
        level_positions = offset + torch.arange(depth, device=device)  # offset: an int, or a device scalar
        for level in range(depth):
            lo = 0 if level == 0 else 1 + (level - 1) * beam
            hi = lo + nodes.token.numel()
            g, k, v, q = levels.inputs(nodes.before, nodes.last, nodes.token, level_positions[level].expand(hi - lo))
            draft_k[:, lo:hi], draft_v[:, lo:hi] = k, v
            head_state = levels.output(level + 1, state.last_hidden, g, q, prefix_k, prefix_v, draft_k[:, :hi],
                                       draft_v[:, :hi], nodes.visible[:, :hi], prefix_visible)
            logp, children = self.candidates(level + 1, head_state, beam)
            scores, tokens, parents, nodes = levels.expand(nodes, logp, children, sum(p[0].numel() for p in pool),
                                                           hi, level + 1 < depth, self.odds_at(level + 1, device))
            pool.append((scores, tokens, parents))
        tokens, parents, depths, ancestors, siblings = levels.choose(
            *(list(column) for column in zip(*pool)), _candidate_depths(shape, device), root, shape.size, depth)
        tree.refill(parents, depths, ancestors, siblings)
        return tokens

    def rows(self, count: int, capacity: int, device) -> ChimeraRows:
        """Drafting state for ``count`` rows of a running batch, drafted all at once (drafters/rows.py)."""
        return ChimeraRows(self, count, capacity, device)

    # ----- training ----------------------------------------------------------------------------------------

    def unrolled_forward(self, tokens: torch.Tensor, hidden: torch.Tensor, depth: int,
                         roots: torch.Tensor | None = None):
        """Draft chains from many roots at once, exactly as inference drafts a chain.

        tokens (B, L) and the base's hidden states (B, L, d). The chain rooted at r has verified prefix
        x_0..x_{r-1}; at depth k it queries position r+k-1 with the trigram of its own chain (true tokens up to
        x_r, then its own top-1 drafts), attends to the verified keys before r and to its own depth 1..k draft
        keys, and head k predicts x_{r+k}. ``roots`` (B, m) picks the chains (default: every position), which
        keeps the vocabulary projection, the dominant cost, proportional to m. Returns per-depth lists of
        logits (B, m, V) and u (B, m, d).
        """
        B, L = tokens.shape
        if roots is None:
            roots = torch.arange(L, device=tokens.device).expand(B, L)
        pad = torch.full((B, 2), self.pad_id, dtype=tokens.dtype, device=tokens.device)
        ext = torch.cat([pad, tokens], 1)  # ext[:, t + 2] is x_t
        g_all = self.trigram(ext[:, :-2], ext[:, 1:-1], ext[:, 2:])
        pos = torch.arange(L, device=tokens.device)
        ver_k, ver_v = self.layer.keys_values(self.verified_input(hidden.to(g_all.dtype), g_all), pos)
        gather = lambda x, idx: torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        # h_{r-1} for chain r (a chain at r = 0 has no verified prefix; the trainer masks it)
        h_last = gather(hidden.to(g_all.dtype), (roots - 1).clamp(min=0))
        visible = pos[None, None, :] < roots[:, :, None]  # (B, m, L): verified key p visible iff p < r
        prev2, prev1 = torch.gather(ext, 1, roots + 1), torch.gather(tokens, 1, roots)
        g = gather(g_all, roots)
        draft_k, draft_v, all_logits, all_u = [], [], [], []
        for k in range(1, depth + 1):
            qpos = roots + (k - 1)
            dk, dv = self.layer.keys_values(g, qpos)
            draft_k.append(dk)
            draft_v.append(dv)
            q = self.layer.queries(g, qpos)  # (B, kvh, grp, m, hd)
            u = self.layer.finish(g, _attend_chains(q, ver_k, ver_v, visible, draft_k, draft_v))
            logits = self.head_logits(k, h_last, u)
            all_logits.append(logits)
            all_u.append(u)
            if k < depth:
                drafted = logits.detach().argmax(-1)
                g = self.trigram(prev2, prev1, drafted)
                prev2, prev1 = prev1, drafted
        return all_logits, all_u

    # ----- persistence -------------------------------------------------------------------------------------

    def trainable_state_dict(self, dtype: torch.dtype | None = None) -> dict:
        return persist.trainable_state(self, dtype)

    def save(self, directory, extra_config: dict | None = None, dtype: torch.dtype | None = None) -> None:
        config = {"architecture": "chimera", **asdict(self.config), "acceptance": self.acceptance_profile,
                  "acceptance_odds": self.acceptance_odds, **(extra_config or {})}
        persist.save_directory(directory, config, self.trainable_state_dict(dtype), self.token_counts)


def odds_line(logp: torch.Tensor, slope, intercept) -> torch.Tensor:
    """log sigmoid(slope * logit(p) + intercept) for p = exp(logp): a probability moved along a line in log-odds
    (trainer.acceptance_odds fits one per head; floats or device scalars). Pure tensor ops."""
    logp = logp.clamp(max=-1e-6)
    return F.logsigmoid(slope * (logp - torch.log(-torch.expm1(logp))) + intercept)


def expand_beam(nodes: Beam, logp: torch.Tensor, children: torch.Tensor, pool_size: int, first_row: int,
                grow: bool, odds: torch.Tensor | None = None):
    """One level of a dynamic tree: each queried node's ``k`` children (``children`` (m, k), their log-probabilities
    ``logp``, moved along the head's ``odds`` line (slope, intercept) to their chance of acceptance where it was
    measured) scored as their parent's path score plus a log-probability capped below zero (so a child always scores
    below its parent, and a chosen set holds its parents), with their parents' places in the pool; and where the
    tree ``grow``s, the ``k`` best of them as the next level's beam, queried from row ``first_row`` on. Pure tensor
    ops: ``compiled_levels`` fuses them."""
    if odds is not None:
        logp = odds_line(logp, odds[0], odds[1])
    k = children.shape[-1]
    scores = (nodes.score[:, None] + logp.clamp(-30.0, -1e-4)).flatten()
    tokens = children.flatten()
    parents = nodes.pool_index[:, None].expand(-1, k).flatten()
    if not grow:
        return scores, tokens, parents, None
    best = scores.topk(k).indices
    parent = best // k
    rows = first_row + torch.arange(k, device=best.device)
    own = rows[:, None] == torch.arange(nodes.visible.shape[-1], device=best.device)[None, :]
    beam = Beam(tokens[best], nodes.token[parent], nodes.last[parent], scores[best], pool_size + best,
                nodes.visible[parent] | own)
    return scores, tokens, parents, beam


def choose_tree(scores: list, tokens: list, parents: list, pool_depth: torch.Tensor, root: torch.Tensor, size: int,
                max_depth: int):
    """The ``size - 1`` best-scored candidates (each level's ``expand_beam`` output, in level order) under the root, in
    depth order (best first within a depth): the tree's tokens, parent node indices, depths and masks
    (``tree_masks``). Pure tensor ops: ``compiled_levels`` fuses them."""
    scores, tokens, parents = torch.cat(scores), torch.cat(tokens), torch.cat(parents)
    chosen = scores.topk(size - 1).indices  # best first
    chosen = chosen[torch.sort(pool_depth[chosen], stable=True).indices]
    node_of = torch.zeros(tokens.numel() + 1, dtype=torch.long, device=tokens.device)  # pool index + 1 -> node
    node_of[chosen + 1] = torch.arange(1, size, device=tokens.device)
    zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
    tree_parents = torch.cat([zero, node_of[parents[chosen] + 1]])
    return (torch.cat([root.reshape(1), tokens[chosen]]), tree_parents, torch.cat([zero, pool_depth[chosen]]),
            *tree_masks(tree_parents, max_depth))


TOP_K_CHUNK = 1024  # columns per block of top_k's first pass on a GPU


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)`` along the last axis (values, column indices, best first); on a GPU over rows wider than
    4 x TOP_K_CHUNK through ``blockwise_top_k``."""
    if scores.device.type == "cuda" and scores.shape[-1] > 4 * TOP_K_CHUNK:
        return blockwise_top_k(scores, k)
    return scores.topk(k)


def blockwise_top_k(scores: torch.Tensor, k: int, chunk: int = TOP_K_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)`` in two passes: the best ``k`` of each block of ``chunk`` columns, then the best ``k`` of
    those (ties may resolve to other columns). A single top-k over a vocabulary-wide row runs PyTorch's multi-block
    radix selection on a GPU, about 14 kernels a call; this takes 7 (session 13, docs/benchmarks.md)."""
    columns = scores.shape[-1]
    pad = -columns % chunk
    blocks = F.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    values, index = blocks.unflatten(-1, (-1, chunk)).topk(k)  # (..., blocks, k)
    index = index + torch.arange(0, columns + pad, chunk, device=scores.device)[:, None]
    values, pick = values.flatten(-2).topk(k)
    return values, index.flatten(-2).gather(-1, pick)


_CANDIDATE_DEPTHS: dict = {}


def _candidate_depths(shape, device) -> torch.Tensor:
    """The depth of each candidate of a dynamic tree: ``beam`` at depth 1, ``beam**2`` at each deeper one."""
    key = (shape, str(device))
    if key not in _CANDIDATE_DEPTHS:
        sizes = [shape.beam] + [shape.beam * shape.beam] * (shape.depth - 1)
        _CANDIDATE_DEPTHS[key] = torch.tensor([d + 1 for d, n in enumerate(sizes) for _ in range(n)], device=device)
    return _CANDIDATE_DEPTHS[key]


@dataclass
class _TreePlan:
    trigram_index: torch.Tensor  # (n, 3) indices into [history[0], history[1], node tokens...]
    width: list[int]  # candidates needed per level (max rank + 1), level 0 unused
    children: list  # per level >= 1: (slot of parent within previous level, rank)


_PLANS: dict = {}


def _tree_plan(tree: TreeBuffers) -> _TreePlan:
    """Static indices for drafting a topology, cached per topology and device."""
    key = (tree.topology, str(tree.depths.device))
    if key not in _PLANS:
        topo = tree.topology
        ext_parent = [1] + [p + 2 for p in topo.parents[1:]]  # root's parent is history[1]
        rows = []
        for i in range(topo.size):
            p = ext_parent[i]
            gp = 0 if i == 0 else (ext_parent[p - 2] if p >= 2 else 0)
            rows.append((gp, p, i + 2))
        width = [1] + [max(topo.ranks[j] for j in topo.levels[lv]) + 1 for lv in range(1, topo.max_depth + 1)]
        device = tree.depths.device
        _PLANS[key] = _TreePlan(
            trigram_index=torch.tensor(rows, device=device),
            width=width,
            children=[None] + [tree.level_children(lv) for lv in range(1, topo.max_depth + 1)],
        )
    return _PLANS[key]


def _attend(q, prefix_k, prefix_v, draft_k, draft_v, draft_allowed, prefix_visible=None):
    """Tree-node queries q (kvh, grp, m, hd) over the whole verified prefix (kvh, s, hd; only the positions
    ``prefix_visible`` (s,) when given) and the draft nodes they may see (kvh, n, hd; ``draft_allowed`` (m, n)).
    Scores are joined, keys are never copied. Any axes in front (a running batch's rows: drafters/rows.py) are
    carried through, ``prefix_visible`` then broadcasting against the scores (rows, 1, 1, 1, s)."""
    scale = q.shape[-1] ** -0.5
    s_prefix = torch.einsum("...hgmd,...hsd->...hgms", q, prefix_k) * scale
    if prefix_visible is not None:
        s_prefix = s_prefix.masked_fill(~prefix_visible, float("-inf"))
    s_draft = torch.einsum("...hgmd,...hnd->...hgmn", q, draft_k) * scale
    s_draft = s_draft.masked_fill(~draft_allowed, float("-inf"))
    probs = torch.cat([s_prefix, s_draft], -1).float().softmax(-1).to(q.dtype)
    s = prefix_k.shape[-2]
    return (torch.einsum("...hgms,...hsd->...hgmd", probs[..., :s], prefix_v)
            + torch.einsum("...hgmn,...hnd->...hgmd", probs[..., s:], draft_v))


def _attend_chains(q, ver_k, ver_v, visible, draft_k, draft_v):
    """Chain attention for training: q (B, kvh, grp, m, hd), one query per chain; verified keys (B, kvh, L, hd)
    masked by ``visible`` (B, m, L); plus each chain's own draft keys (B, kvh, m, hd), one per depth so far."""
    scale = q.shape[-1] ** -0.5
    s_ver = torch.einsum("bhgmd,bhsd->bhgms", q, ver_k) * scale
    s_ver = s_ver.masked_fill(~visible[:, None, None], float("-inf"))
    s_own = torch.stack([torch.einsum("bhgmd,bhmd->bhgm", q, dk) for dk in draft_k], -1) * scale
    probs = torch.cat([s_ver, s_own], -1).float().softmax(-1).to(q.dtype)
    L = ver_k.shape[-2]
    out = torch.einsum("bhgms,bhsd->bhgmd", probs[..., :L], ver_v)
    own_v = torch.stack(draft_v, -2)  # (B, kvh, m, depth, hd)
    return out + torch.einsum("bhgmk,bhmkd->bhgmd", probs[..., L:], own_v)


def load_drafter(path, model, dtype: torch.dtype | None = None) -> ChimeraDrafter:
    """Load a saved drafter for ``model``; refuse one built for another base."""
    raw = persist.read_config(path)
    config = persist.build_config(ChimeraConfig, raw, path)
    persist.check_base(config.base, model, path)
    persist.check_sizes(config, model, path)
    drafter = ChimeraDrafter(config, model.get_input_embeddings(), model.get_output_embeddings())
    persist.load_weights(drafter, path)
    drafter.acceptance_profile = persist.acceptance_profile(raw, config.num_draft_heads)
    drafter.acceptance_odds = persist.acceptance_odds(raw, config.num_draft_heads)
    drafter.token_counts = persist.load_token_counts(path, config.vocab_size)
    weight = model.get_input_embeddings().weight
    return drafter.to(device=weight.device, dtype=dtype or weight.dtype).eval().requires_grad_(False)
