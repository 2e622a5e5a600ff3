"""Drafting for every row of a running batch at once (batch.py): a chain of greedy drafts per row, in one set of
kernels for all rows, where the lone decoder's ``Drafter`` protocol drafts one sequence at a time.

Drafted per sequence, a batch of 16 paid 16 drafters' launches a step (three levels of some 40 kernels each), more
than the step's forward; here a level is one pass over all rows, and the batch's whole drafted step (draft, verify,
accept, read the verified tokens into the drafter) has fixed shapes per rows bucket and no host read, so a CUDA
graph replays it (batch.py).

What a row's drafting reads and where it lives, each fact in one place:
- the tokens: the root (the row's newest token) and the two before it come from the batch's host lists, as inputs
  of each step (``tokens`` (rows, 3));
- the base's hidden state after the last verified token: the batch keeps every row's (``RunningBatch.hidden``);
- the Chimera layer's keys and values over the verified prefix: here, one (rows, kv heads, capacity, head size)
  buffer each, slot p the layer's key of position p, as the base's own slots;
- how far each row's drafter keys reach: the batch's ``Sequence.drafted``, on the host.
Nothing else changes as a row drafts, so a step's writes are the same whatever the state it starts from: the
graph runner's warm-up runs of a capture leave nothing behind that a replay would not write the same way.

Every class here offers ``read`` (verified tokens into the drafter's per-row state), ``propose`` (a chain per row),
``move`` (a row's state into another row, as the batch's rows move when a sequence leaves) and ``compile`` (draft
through torch.compile from then on, where the batch's step is compiled). Compiled, the Chimera drafter's chains are
one compilation a depth for any number of rows (on an H100, 14, 24 and 30 s for depths 1, 2 and 3, session 18). On an
H200 a chain of 3 levels then took 108 kernels and 0.28-0.42 ms of device time at 2-64 rows, 12-17 % of a drafted
step (session 19; op by op, session 18's H100 had spent about 1.5 ms a step drafting). What a drafted step costs is
now the forward that verifies the chains (batch.py).
"""

from __future__ import annotations

import torch

from ..compiled import Compiled, CompiledDecoder, announced

PAD = -1  # in ``tokens``: no token (a position before the sequence's start), each drafter's own pad once read


class ChimeraRows:
    """The Chimera drafter's state for ``count`` rows of ``capacity`` slots: its layer's keys and values."""

    def __init__(self, drafter, count: int, capacity: int, device):
        c = drafter.config
        self.drafter = drafter
        self.capacity = capacity
        # zeros, not empty: attention weighs the slots past a row's length by 0, and 0 times inf or NaN is NaN. One
        # slot more than a row holds, never read: a step attends over a window of the slots, a view, which would be
        # contiguous where it spans the whole buffer and not otherwise, and the drafter's compiled chains, whose
        # attention depends on that, were compiled again for a window of every slot (a counting backend on this CPU)
        self.keys = torch.zeros(count, c.num_kv_heads, capacity + 1, c.head_dim, dtype=drafter.fuse.weight.dtype,
                                device=device)
        self.values = torch.zeros_like(self.keys)
        self.chains = draft_chains  # or its compiled twin (``compile``)

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.masked_fill(tokens == PAD, self.drafter.pad_id)

    @torch.no_grad()
    def read(self, rows: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor, starts: torch.Tensor) -> None:
        """The base verified, in each of ``rows`` (r,), ``tokens[:, 2:]`` (r, P) from position ``starts`` (r,) on,
        with final hidden states ``hidden`` (r, P, d); ``tokens[:, :2]`` are the two tokens before ``starts`` (PAD
        before the sequence's start). Writes the layer's keys and values of all P (a row whose verified tokens are
        fewer writes past its length, slots hidden until overwritten; slots past the capacity fold onto the last,
        which a drafting row never reaches)."""
        slots = (starts[:, None] + torch.arange(tokens.shape[1] - 2, device=tokens.device)).clamp(max=self.capacity - 1)
        keys, values = self.drafter.verified_keys_values(self._tokens(tokens), hidden, slots)
        self.keys[rows[:, None], :, slots] = keys.transpose(1, 2)  # (rows, tokens) indexed, heads sliced
        self.values[rows[:, None], :, slots] = values.transpose(1, 2)

    def compile(self, backend: str = "inductor") -> None:
        """Draft through the drafter's compiled chains (``compiled_chains``) from now on: where the batch's step is
        compiled. Its trigram route and tables are settled first (``prepare_inference``): compiled code reads them
        as they are."""
        self.drafter.prepare_inference()
        self.chains = compiled_chains(self.drafter, backend)

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, starts: torch.Tensor, last_hidden: torch.Tensor, depth: int,
                attended: torch.Tensor) -> torch.Tensor:
        """A chain of ``depth`` greedy drafts for each of the first R rows: ``tokens`` (R, 3) the two tokens before
        each row's root and the root, at position ``starts`` (R,) (the row's verified length, its keys' reach);
        ``last_hidden`` (R, d) the base's hidden state before the root. Attends over the slots ``attended`` (window,),
        0 to window - 1: the batch's own for the step (``RowSlotCache.attended``). Returns (R, depth + 1): the root,
        then the drafts (``draft_chains``)."""
        keys, values = self.keys, self.values
        tokens = self._tokens(tokens)
        if isinstance(self.chains, Compiled):  # one compilation a depth, for any rows, window and buffers' sizes (the
            # rows and the window symbols in the inputs, the buffers whole: a view's sizes would be compiled as
            # constants)
            CompiledDecoder.mark_symbol(0, tokens, starts, last_hidden, keys, values, attended)
            CompiledDecoder.mark_symbol(2, keys, values)
        with announced(self.chains, f"{depth} drafts a row, any number of rows"):
            return self.chains(self.drafter, keys, values, attended, tokens, starts, last_hidden, depth)

    @torch.no_grad()
    def move(self, source: int, target: int, length: int) -> None:
        self.keys[target, :, :length] = self.keys[source, :, :length]
        self.values[target, :, :length] = self.values[source, :, :length]


@torch.no_grad()
def draft_chains(drafter, keys: torch.Tensor, values: torch.Tensor, attended: torch.Tensor, tokens: torch.Tensor,
                 starts: torch.Tensor, last_hidden: torch.Tensor, depth: int) -> torch.Tensor:
    """``ChimeraRows.propose`` on explicit state: the layer's ``keys`` and ``values`` (rows, kv heads, capacity, head
    size), of which the first R rows draft over the slots ``attended`` (window,), 0 to window - 1, ``tokens`` (R, 3)
    with the drafter's pad in place of PAD. Each level drafts as the lone drafter's chain does (the same functions,
    ``level_inputs`` and ``level_output``, with a row axis in front), then the head's argmax."""
    rows, c = tokens.shape[0], drafter.config
    keys, values = keys[:rows, :, :attended.shape[0]], values[:rows, :, :attended.shape[0]]
    visible = (attended < starts[:, None])[:, None, None, None, :]
    seen = torch.ones(depth, depth, dtype=torch.bool, device=tokens.device).tril()  # each draft its ancestors
    draft_k = keys.new_empty(rows, c.num_kv_heads, depth, c.head_dim)
    draft_v = torch.empty_like(draft_k)
    h_last = last_hidden.to(keys.dtype)[:, None]
    before, last, token = tokens[:, :1], tokens[:, 1:2], tokens[:, 2:]
    chain = [tokens[:, 2]]
    for level in range(depth):
        g, k, v, q = drafter.level_inputs(before, last, token, (starts + level)[:, None])
        draft_k[:, :, level:level + 1], draft_v[:, :, level:level + 1] = k, v
        state = drafter.level_output(level + 1, h_last, g, q, keys, values, draft_k[:, :, :level + 1],
                                     draft_v[:, :, :level + 1], seen[level:level + 1, :level + 1], visible)
        logits, column_ids = drafter.draft_logits(level + 1, state)
        pick = logits.argmax(-1)  # (R, 1)
        before, last, token = last, token, pick if column_ids is None else column_ids[pick]
        chain.append(token[:, 0])
    return torch.stack(chain, 1)


def compiled_chains(drafter, backend: str = "inductor") -> Compiled:
    """``draft_chains`` through torch.compile, one per drafter and backend (every batch drafting with it replays what
    the first compiled): inductor fuses each level's norms, rotary, attention, MLP and the head around the matrix
    products, where op by op a chain of 3 levels ran some 400 operations (this CPU's profile, default model). The
    vocabulary projection and its argmax are compiled with the rest: a chain reads no log-softmax or top-k, the
    reductions that inductor split into many kernels in the lone drafter's trees (``compiled_levels``)."""
    cache = drafter.__dict__.setdefault("_compiled_chains", {})
    if backend not in cache:
        cache[backend] = Compiled(draft_chains, "the drafter's chains of a running batch", backend)
    return cache[backend]


class MedusaRows:
    """Medusa's heads read only the last verified hidden state, which the batch keeps: no state of their own."""

    def __init__(self, drafter):
        self.drafter = drafter

    def read(self, rows, tokens, hidden, starts) -> None:
        pass

    def compile(self, backend: str = "inductor") -> None:
        """Nothing to compile: a chain is the heads' argmax, a few kernels with nothing between them to fuse."""

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, starts: torch.Tensor, last_hidden: torch.Tensor, depth: int,
                attended: torch.Tensor) -> torch.Tensor:
        """``ChimeraRows.propose``'s chains: head k's best token k steps past each row's root."""
        drafter = self.drafter
        logits = torch.stack(drafter.head_logits(last_hidden, depth), 1)  # (R, depth, vocab)
        return torch.cat([tokens[:, 2:], logits.argmax(-1)], 1)

    def move(self, source: int, target: int, length: int) -> None:
        pass
