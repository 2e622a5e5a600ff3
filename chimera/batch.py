"""Decoding of a running batch: sequences join after their prefill and leave when they stop, and every step decodes
all of them in a single forward (continuous batching): one token each, or, with a drafter, a drafted chain each.

A lone request is served faster by speculation (generate.py); many at once are served faster together: the
forward reads the weights once for the whole batch, so on a small model a step of 16 sequences costs little more
than a step of one. The server (server/engine.py) runs this batch whenever more than one request is in flight.

On a GPU the plain step runs in fixed shapes, a power-of-two number of rows (idle rows padded: each reads the last
slot of its row, which a sequence writes before it ever reads it), captured once per shape and replayed
(graph_runner.py), and, in bfloat16 and float16, through the compiled decoder stack (compiled.py; the rows and the
window symbols, so one compilation serves every bucket, a lone member padded to two rows), attending over a
power-of-two window of slots, the smallest that holds the longest member. (Until session 20 a compiled step attended
over every slot of its rows, one shape a bucket; then an H100 showed a chain's verifying attention growing with the
slots: one layer's, 64 rows of 4 tokens, 84 us over 1,024 slots and 155 over 2,048, of one token 31 and 39,
scripts/batch_attention_kernels.py; the whole forward that verified chains of 4 tokens over 1,024 slots took 1.6 ms
for 2 rows and 4.4 for 64, 2.5 of it cuDNN's attention, where a plain forward of 16 rows took 1.3.) Graphs are
captured per rows bucket and window (and depth), in one memory pool. Its attention is SDPA's own grouped-query kernel,
the keys and values not repeated per query head (attention.py's ``batch_attention``, on a twin of the model; for a
drafted chain too since session 17). A joining sequence's prompt is padded to a power-of-two length and read from a
capture per length, its row chosen on the device (compiled too, its length a symbol: one more compilation).
``warm_up`` captures every shape before the first request (server start, ``chimera throughput``'s untimed setup).
Measured on an H100 (docs/benchmarks.md, sessions 14-17), total tokens/s of `ar` at 4 / 16 / 64 clients: eager
forwards 125 / 274 / -, graphed 459 / 685 / 990 (captures inside the timing), compiled with captured prefills 1,251 /
2,675 / 3,478 (session 16), with the KV written by index (cache.py) and grouped SDPA 2,379 / 5,970 / 11,188 (session
17), against 880 for one client alone: 12.7x at 64.

Each sequence keeps what makes its output its own: its KV row, its length, its sampling settings and seeded
generator, its stop condition. Every sequence of a batch decodes token for token what it decodes alone in
float32 (greedy, and sampled with a seed: the same draws in the same order; tests/test_batch.py).

Speculation in the batch: every row drafts a chain of greedy tokens from its newest one, all rows at once
(drafters/rows.py: the drafter's per-row keys and values in one buffer; a row's two tokens before its root and the
base's last hidden state are the batch's own), and one forward verifies every chain, (rows, depth + 1) tokens at
each row's own positions: one capturable function per rows bucket and depth (``_chain_forward``), compiled where the
plain step is (the base's forward once for every depth, the drafter's chains once a depth: drafters/rows.py). A
chain needs no tree mask (it is causal) and no compaction: the accepted prefix of a chain already sits in the row's
next slots, and the slots of rejected tokens lie past the row's length, hidden until overwritten. Greedy acceptance
per row is the longest run of drafts equal to the base's argmax before them, all rows at once. (Drafted per
sequence, as until session 17, a batch of 16 paid 16 drafters' launches a step: on an H100 `chimera` served 233
tokens/s at 16 clients against `ar`'s 356, docs/benchmarks.md session 13.)
How deep a step drafts, from 0 (plain) to ``draft_depth``, is measured per power-of-two batch size (chain_depth.py:
the depth of the most tokens per second; the forward's cost grows with its tokens, so a depth that pays for 2
sequences may not for 16). On a GPU, ``warm_up`` times every captured step to seed those choices. Measured on an
H100 (session 18, before the drafter's chains were compiled): a drafted step of depth 3 cost 2.0-2.4 plain steps
at 1-64 rows for 1.8-2.0 tokens a row, and `chimera` served 0.97x / 0.88x / 0.94x `ar`'s throughput at 4 / 16 / 64
clients, having drafted 1-13 % of its steps to measure every depth at every size. On an H200 with the chains
compiled (session 19): 1.7 / 1.9 / 2.5 plain steps at 1-4 / 16 / 64 rows, the forward that verifies the chains
1.5-3.8 ms of it (a plain forward: 1.2-1.7), and `chimera` 0.81x / 0.95x `ar` at 16 / 64 clients, drafting 4 % of
its steps. Only greedy batches draft (a sampled member's draws must stay those of its plain decoding). A member's
prompt is read into the drafter at its join (inside the prefill's capture); one whose drafter has not read some
verified tokens since (plain steps) catches up before it drafts; one with no drafter state (it joined with copied
keys and values, no hidden states to read) rides along: none of its chain is accepted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import attention, target
from .chain_depth import ChainDepth, Exploration, SeedExcess, yields
from .cache import RowSlotCache
from .cache_argument import cache_kwargs
from .compiled import CompiledDecoder, announced, compilable
from .errors import ChimeraError
from .generate import GenerationResult, Progress
from .graph_runner import GraphRunner, power_of_two_at_least
from .models import context_limit, synchronize
from .acceptance import greedy_accept_chains
from .sampling import SamplingConfig, target_probs
from .text import StopCondition, eos_token_ids, stop_condition
from .drafters import feature_layers_of
from .drafters.rows import PAD
from .tree import additive_mask

SMALLEST_WINDOW = 64  # attention covers a power-of-two number of slots, so a few shapes serve every length
SMALLEST_PREFILL = 16  # tokens: a captured prefill's shortest padded length
PREFILL_SHAPE = "a running batch's prefills of any padded length"  # what their one compilation serves (announced)
DRAFT_DEPTH = 3  # drafted tokens per sequence in a batch's drafting step
VERIFY_GRAPHS = ("shared", "per-depth")  # RunningBatch's choices of compiled forwards that verify drafted chains
TIMED_REPLAYS = 5  # replays of each captured step timed at warm-up (a GPU step: about 1-6 ms)


@dataclass
class StepCounts:
    """What a running batch's steps did, for reports (``chimera throughput``): how deep they drafted, and what a
    drafted step yielded."""

    by_depth: dict[int, int] = field(default_factory=dict)  # steps at each chain depth (0: plain)
    seconds_by_depth: dict[int, float] = field(default_factory=dict)  # their time, host and device (one read a step)
    drafted_rows: int = 0  # sequences in the drafted steps
    drafted_tokens: int = 0  # tokens they emitted
    catch_up_seconds: float = 0.0  # of the drafted steps' time, the host's in ``_catch_up`` (its kernels run on)

    def add(self, depth: int, rows: int, tokens: int, seconds: float = 0.0) -> None:
        self.by_depth[depth] = self.by_depth.get(depth, 0) + 1
        self.seconds_by_depth[depth] = self.seconds_by_depth.get(depth, 0.0) + seconds
        if depth:
            self.drafted_rows += rows
            self.drafted_tokens += tokens

    @property
    def steps(self) -> int:
        return sum(self.by_depth.values())

    @property
    def drafted(self) -> int:
        """Drafted steps."""
        return self.steps - self.by_depth.get(0, 0)

    @property
    def tau(self) -> float | None:
        """Tokens a sequence emitted per drafted step."""
        return self.drafted_tokens / self.drafted_rows if self.drafted_rows else None


@dataclass
class Sequence:
    """One member of the running batch."""

    prompt_ids: list[int]
    stopper: StopCondition
    sampling: SamplingConfig
    generator: torch.Generator | None
    started: float = field(default_factory=time.perf_counter)
    length: int = 0  # tokens in its KV row (the prompt, then every emitted token but the newest)
    next_token: int = 0  # the newest emitted token, the input of its next step
    accepted: list[int] = field(default_factory=lambda: [1])  # tokens each forward emitted, the prefill first
    hidden_kept: bool = True  # the batch holds the final hidden states of its whole row (for a move out)
    drafted: int | None = None  # positions its row's drafter state has read; None: it has none (drafters/rows.py)

    @property
    def done(self) -> bool:
        return self.stopper.done

    def tokens_at(self, start: int, stop: int) -> list[int]:
        """Its tokens at positions ``start`` to ``stop`` - 1: of the prompt, then of the output; PAD before the start,
        0 past the newest. Slices, not the whole sequence joined (a step reads three tokens a row)."""
        prompt, output, first = self.prompt_ids, self.stopper.tokens, max(start, 0)
        before = [PAD] * (first - start)
        known = prompt[first:stop] + output[max(first - len(prompt), 0):max(stop - len(prompt), 0)]
        return before + known + [0] * (stop - start - len(before) - len(known))

    def progress(self) -> Progress:
        """Where this sequence stands, to continue it alone (``SpeculativeDecoder.resume``)."""
        return Progress(self.prompt_ids, self.stopper, self.sampling, self.generator, self.result(), self.started)

    def result(self) -> GenerationResult:
        return GenerationResult(self.stopper.text, self.stopper.tokens, len(self.prompt_ids),
                                self.stopper.finish_reason or "", steps=len(self.accepted),
                                seconds=time.perf_counter() - self.started, accepted=self.accepted)


class RunningBatch:
    """Up to ``max_batch`` sequences of at most ``capacity`` tokens each, decoding together.

    ``add`` prefills a sequence and returns it with its first text; ``step`` decodes one token of every running
    sequence and returns each one's new text; ``remove`` takes a sequence out (finished, cancelled or timed out).
    The KV memory (max_batch x capacity slots per layer) is allocated on the first prefill, once.
    """

    def __init__(self, model, tokenizer, max_batch: int, capacity: int | None = None, drafter=None,
                 draft_depth: int = DRAFT_DEPTH, adaptive: bool = True, fixed_shapes: bool | None = None,
                 compiled: bool = False, backend: str = "inductor", features: tuple[int, ...] | None = None,
                 verify_graphs: str = "shared", chain_attention: str = "grouped"):
        if max_batch < 1:
            raise ChimeraError(f"the batch size must be at least 1, got {max_batch}")
        if verify_graphs not in VERIFY_GRAPHS:
            raise ChimeraError(f"verify_graphs must be one of {', '.join(VERIFY_GRAPHS)}, got {verify_graphs!r}")
        if chain_attention not in attention.CHAIN_ATTENTION:
            raise ChimeraError(f"chain_attention must be one of {', '.join(attention.CHAIN_ATTENTION)}, got "
                               f"{chain_attention!r}")
        # ``chain_attention`` "folded": a drafted chain's query heads folded into queries of their key head on a GPU
        # (attention.batch_attention_folded), a candidate for the costly verifying forward, off until measured
        self.model = model = attention.batch_model(model, chain_attention)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.capacity = min(capacity or context_limit(model), context_limit(model))
        self.max_batch = max_batch
        self.cache = RowSlotCache(model.config.get_text_config().num_hidden_layers, max_batch, self.capacity,
                                  self.device)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.running: list[Sequence] = []  # row i holds running[i]
        self.hidden: torch.Tensor | None = None  # (max_batch, capacity, hidden) final hidden states, on first use
        # a graphed drafter keeps one state for its one generation: the batch drafts with the drafter inside it,
        # every row at once (drafters/rows.py)
        drafter = getattr(drafter, "drafter", drafter)
        # the hidden states kept per token (target.feature_states): what the drafter reads, this batch's or (where
        # the batch does not draft) the lone decoder's, which a sequence leaving the batch takes along
        self.features = feature_layers_of(drafter) if features is None else tuple(features)
        drafter = drafter if draft_depth > 0 else None
        heads = getattr(getattr(drafter, "config", None), "num_draft_heads", draft_depth)
        if drafter is not None and heads < draft_depth:
            raise ChimeraError(f"the drafter has {heads} heads: it cannot draft chains of {draft_depth}")
        self.draft_depth = draft_depth
        self.drafts = drafter.rows(max_batch, self.capacity, self.device) if drafter is not None else None
        self.adaptive = adaptive
        # how deep to draft, per power-of-two number of running sequences and window (what a step's cost depends on)
        self.depths: dict[tuple[int, int], ChainDepth] = {}
        self.yields = yields(draft_depth)  # tokens a sequence emits a step by depth, shared by the sizes' choices
        self.exploration = Exploration()  # and when they return to the deepest depth to refresh those yields
        self.seed_excess = SeedExcess()  # and what their drafted steps cost above the warm-up's replays
        # (rows, window): a captured step's seconds by depth, timed at warm-up
        self.warm_costs: dict[tuple[int, int], dict[int, float]] = {}
        self.counts = StepCounts()
        # plain steps over a power-of-two number of rows (the idle ones padded), so that each (rows, window) shape is
        # captured once and replayed: by default on a GPU, where an eager step is bound by its ~600 launches
        self.fixed_shapes = self.device.type == "cuda" if fixed_shapes is None else fixed_shapes
        self.runner = GraphRunner(graphs=self.fixed_shapes and self.device.type == "cuda", shared_pool=True)
        # ``compiled``: the plain step's decoder stack through torch.compile (compiled.py), one compilation for any
        # number of rows and any window (symbols; one row apart)
        self.decoder = (CompiledDecoder.shared(self.model, backend) if compiled and self.fixed_shapes
                        and compilable(self.model) else None)
        if self.decoder is not None and self.drafts is not None:
            self.drafts.compile(backend)  # the drafter's chains too (drafters/rows.py): one compilation a depth
        # the compiled forward that verifies drafted chains: "shared", one compilation for every depth (the chain's
        # length a symbol), or "per-depth", one a depth (its length a constant, as a plain step's is). On an H200 the
        # shared one verified 2 rows of 4 tokens in 1.5 ms where a plain forward of 16 rows took 1.2 (session 19):
        # whether fixed lengths verify faster is for the GPU to measure (scripts/batch_step_cost.py --verify-graphs)
        self.verify_graphs = verify_graphs

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a sequence of this size fits a row (else it must be decoded alone)."""
        return prompt_tokens + max_new_tokens <= self.capacity

    @property
    def full(self) -> bool:
        return len(self.running) >= self.max_batch

    def add(self, prompt_ids: list[int], max_new_tokens: int, stop=(), sampling: SamplingConfig = SamplingConfig()
            ) -> tuple[Sequence, str]:
        self._check_room(prompt_ids)
        stopper = stop_condition(self.tokenizer, self.eos_ids, max_new_tokens, self.capacity - len(prompt_ids), stop)
        sequence = Sequence(list(prompt_ids), stopper, sampling,
                            None if sampling.greedy else sampling.generator(self.device))
        logits = self._prefill(sequence, prompt_ids)
        token = self._choose(logits[:, -1], [sequence])[0]
        sequence.next_token = token
        return sequence, sequence.stopper.push_step([token])

    def adopt(self, progress: Progress) -> Sequence:
        """Continue here a decoding begun elsewhere (alone, speculatively): its row gets the KV of the prompt and
        every emitted token but the newest, which is its next input (copied from the lone decoding's cache where
        it can be, else prefilled); its stop condition, generator and counts come along, so its text goes on
        where it stopped."""
        stopper = progress.stopper
        if stopper.done or not stopper.tokens:
            raise ChimeraError("only a decoding that has emitted a token and not stopped can continue in a batch")
        known = [*progress.prompt_ids, *stopper.tokens[:-1]]
        self._check_room(known)
        if len(progress.prompt_ids) + stopper.max_new_tokens > self.capacity:
            raise ChimeraError(f"the request needs {len(progress.prompt_ids) + stopper.max_new_tokens} tokens but a "
                               f"batch row holds {self.capacity}")
        sequence = Sequence(list(progress.prompt_ids), stopper, progress.sampling, progress.generator,
                            started=progress.started, accepted=list(progress.result.accepted))
        pairs = progress.verified_kv() if progress.verified_kv is not None else None
        if pairs and pairs[0][0].shape[2] == len(known) and self.cache.write_row(len(self.running), pairs):
            sequence.length = len(known)  # its KV copied: no prefill (a 1,000-token prompt re-read costs a second)
            sequence.hidden_kept = False  # the lone decoding did not keep its hidden states
            self.running.append(sequence)
        else:
            self._prefill(sequence, known)
        sequence.next_token = stopper.tokens[-1]
        return sequence

    def _check_room(self, prompt_ids: list[int]) -> None:
        if self.full:
            raise ChimeraError(f"the running batch is full ({self.max_batch} sequences)")
        if not prompt_ids:
            raise ChimeraError("empty prompt")
        if len(prompt_ids) >= self.capacity:
            raise ChimeraError(f"the prompt is {len(prompt_ids)} tokens but a batch row holds {self.capacity}")

    def _prefill(self, sequence: Sequence, known: list[int]) -> torch.Tensor:
        """``known`` tokens into the next free row for ``sequence``, which joins the batch; the last one's logits.
        With graphs, the tokens are padded to a power-of-two length and the prefill replayed from a capture per
        length, for any row (an eager prefill costs an H100 about 20 ms, most of it launches, where a step of 64
        rows costs 5-17; docs/gpu/batch_step_cost_session16_h100.jsonl). The pads write slots past the prompt,
        hidden until the row's steps overwrite them; padded products may round otherwise than unpadded ones, so
        the CPU's path (exact against ``generate`` in float32) reads the prompt as it is."""
        row, n = len(self.running), len(known)
        if self.runner.graphs:
            bucket = self._prefill_length(n)
            tokens = torch.tensor([known + [0] * (bucket - n)], device=self.device)
            with announced(self.decoder, PREFILL_SHAPE, first=not self.runner.can_run(("prefill", bucket))):
                logits = self.runner.run(("prefill", bucket), self._padded_prefill, tokens,
                                         torch.tensor([row, n - 1], device=self.device))
        else:
            tokens = torch.tensor([known], device=self.device)
            positions = torch.arange(n, device=self.device)[None]
            logits = self._forward(slice(row, row + 1), tokens, positions, self._window(n), logits_to_keep=1)[0]
            self._read_prompt(tokens, torch.tensor([row], device=self.device))
        sequence.length = n
        sequence.drafted = n if self.drafts is not None else None
        self.running.append(sequence)
        return logits

    def _read_prompt(self, tokens: torch.Tensor, row: torch.Tensor) -> None:
        """A prefilled prompt, ``tokens`` (1, n, padded or not) in ``row`` (1,), into the drafter's state, from the
        final hidden states the prefill kept: at the join, inside the prefill's capture where there is one, rather
        than at the first drafted step (``_catch_up``), where a newcomer's whole prompt had been read eagerly and
        every member behind padded to the longest: on an H100 (session 21) that catching up took 0.20 s of the 0.31 s
        that `chimera` lost to `ar` at 16 clients, and 0.11 of 0.11 s at 64. With the read here (session 26, an
        H100, 240 first turns) catching up took 0.07 and 0.02 s and the joins 0.03 s longer at both (0.57 against
        0.54 s for `ar`'s), and `chimera` served 0.97x and 0.95x `ar`."""
        if self.drafts is None:
            return
        before = torch.full((1, 2), PAD, dtype=tokens.dtype, device=tokens.device)  # nothing before the prompt
        self.drafts.read(row, torch.cat([before, tokens], 1), self.hidden[row, :tokens.shape[1]],
                         torch.zeros_like(row))

    def step(self) -> list[tuple[Sequence, str]]:
        """One step of every running sequence that has not stopped (a token each, or a drafted chain each where the
        batch drafts); (sequence, new text) for each."""
        active = [s for s in self.running if not s.done]
        if not active:
            return []
        if len(active) != len(self.running):
            raise ChimeraError("remove finished sequences before the next step")
        longest = max(s.length for s in active)  # the step's window holds its tokens past the longest
        choice = self._depth_choice(len(active), self._window(longest + self.draft_depth + 1))
        depth = choice.next_depth() if self._can_draft(active) else 0
        start = time.perf_counter()
        window = self._window(longest + depth + 1)
        steps = self._drafted_step(active, depth, window) if depth else self._plain_step(active, window)
        out = []
        for sequence, tokens in zip(active, steps):
            emitted = len(sequence.stopper.tokens)
            out.append((sequence, sequence.stopper.push_step(tokens)))
            sequence.accepted.append(len(sequence.stopper.tokens) - emitted)
        drafting = [len(tokens) - 1 for sequence, tokens in zip(active, steps) if sequence.drafted is not None]
        seconds = time.perf_counter() - start
        choice.record(depth, drafting if depth else [], seconds)
        self.counts.add(depth, len(steps), sum(len(tokens) for tokens in steps), seconds)
        return out

    def warm_up(self) -> float:
        """Capture the prefill for every padded length and the plain step for every shape it can take (each rows
        bucket over each window) before a request meets one: a first capture inside serving stalls every member of
        the batch for it, and a benchmark would count it. Returns the seconds it took; nothing to do without
        captures. The plain step's captured runs write the last slot of each row, as idle rows do (``_plain_step``):
        a sequence writes that slot before it reads it; the prefills' write the first row, so the batch must be
        empty."""
        if not self.runner.graphs:
            return 0.0
        if self.running:
            raise ChimeraError("warm the batch up before its first sequence: its prefills' captures write a row")
        start = time.perf_counter()
        row = torch.tensor([0, 0], device=self.device)  # the first row, scored at its first token
        for length in sorted({self._prefill_length(1 << k) for k in range(self.capacity.bit_length() + 1)}):
            if not self.runner.can_run(("prefill", length)):
                tokens = torch.zeros(1, length, dtype=torch.long, device=self.device)
                with announced(self.decoder, PREFILL_SHAPE):
                    self.runner.capture(("prefill", length), self._padded_prefill, tokens, row)
        windows = sorted({self._window(1 << k) for k in range(self.capacity.bit_length() + 1)})
        for rows in sorted({self._rows(count) for count in range(1, self.max_batch + 1)}):
            for window in windows:
                for depth, (key, function, inputs) in self._idle_steps(rows, window).items():
                    if not self.runner.can_run(key):
                        with announced(self.decoder, self._compiled_shape(rows, depth)):
                            self.runner.capture(key, function, *inputs)
                if self.drafts is not None:  # each depth's cost, to seed the choice of the sizes that run these rows
                    self.warm_costs[rows, window] = {depth: self._replay_seconds(*step)
                                                     for depth, step in self._idle_steps(rows, window).items()}
        return time.perf_counter() - start

    def _idle_steps(self, rows: int, window: int) -> dict[int, tuple]:
        """Each step ``rows`` rows take over ``window`` slots, by depth (0: plain; drafted ones where the batch
        drafts): its capture key, its function and its inputs for idle rows, which write only what a sequence writes
        before it reads it (``_plain_inputs``, ``_chain_inputs``)."""
        steps = {0: (("plain", rows, window), functools.partial(self._plain_forward, window),
                     self._plain_inputs([], rows))}
        for depth in range(1, self.draft_depth + 1) if self.drafts is not None else ():
            steps[depth] = (("chains", rows, window, depth), functools.partial(self._chain_forward, window, depth),
                            self._chain_inputs([], rows))
        return steps

    def _replay_seconds(self, key, function, inputs) -> float:
        """Seconds a captured step takes, over TIMED_REPLAYS replays after an untimed one (its host side, the
        members' bookkeeping, left out)."""
        self.runner.run(key, function, *inputs)
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(TIMED_REPLAYS):
            self.runner.run(key, function, *inputs)
        synchronize(self.device)
        return (time.perf_counter() - start) / TIMED_REPLAYS

    def _prefill_length(self, n: int) -> int:
        """The padded length a captured prefill of ``n`` tokens reads: a power of two, at most a row."""
        return min(power_of_two_at_least(n, SMALLEST_PREFILL), self.capacity)

    def _padded_prefill(self, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """``tokens`` (1, padded length) into row ``where[0]``, causal from slot 0; logits of token ``where[1]`` (the
        prompt's last). Reads the row and the length on the device: one capture serves every row and prompt of this
        padded length."""
        positions = torch.arange(tokens.shape[1], device=self.device)[None]
        logits = self._forward(where[:1], tokens, positions, tokens.shape[1], logits_to_keep=where[1:],
                               decoder=self.decoder)[0]
        self._read_prompt(tokens, where[:1])  # the pads' drafter keys lie past the prompt, hidden like their KV
        return logits

    def _compiled_shape(self, rows: int, depth: int = 0) -> str:
        """What one compilation of a step of ``depth`` drafts a row (0: a plain step) serves
        (compiled.Compiled.announce): any batch size and capacity."""
        what = "" if not depth else (f", a drafted chain of {depth} each" if self.verify_graphs == "per-depth"
                                     else ", a drafted chain of any depth each")
        return f"{'one row' if rows == 1 else 'any number of rows'} of a running batch{what}"  # one: max_batch 1

    def _rows(self, count: int) -> int:
        """The rows a step of ``count`` sequences runs: a power of two with fixed shapes (idle rows padded); two at
        least where the step is compiled, since Dynamo compiles a single row apart from any other number (a fresh
        H100 took 64 s for it beside 73 s for any rows, session 17) and a batch of one member is rare: the server
        decodes a request alone, speculatively, whenever nothing else is in flight."""
        if not self.fixed_shapes:
            return count
        return min(power_of_two_at_least(count, 2 if self.decoder is not None else 1), self.max_batch)

    def _plain_step(self, active: list[Sequence], window: int) -> list[list[int]]:
        rows = self._rows(len(active))
        key = ("plain", rows, window)
        with announced(self.decoder, self._compiled_shape(rows), first=not self.runner.can_run(key)):
            logits = self.runner.run(key, functools.partial(self._plain_forward, window),
                                     *self._plain_inputs(active, rows))
        chosen = self._choose(logits[:len(active), -1], active)
        for sequence, token in zip(active, chosen):
            sequence.length += 1
            sequence.next_token = token
        return [[token] for token in chosen]

    def _depth_choice(self, count: int, window: int) -> ChainDepth:
        """The choice of depth for ``count`` sequences whose steps attend over ``window`` slots (a drafted step's
        verifying attention grows with the slots faster than a plain step's: on an H100, one layer's for 64 rows of 4
        tokens 84 us over 1,024 slots and 155 over 2,048, of one token 31 and 39; session 20)."""
        size = power_of_two_at_least(count, 1)
        if (size, window) not in self.depths:
            costs = self.warm_costs.get((self._rows(count), window))
            replays = costs is not None  # seeds that leave a real step's host part out: what ``seed_excess`` adds
            proportions = None
            if costs is None:  # not timed at warm-up (no captures: a CPU): what this size measured over another
                # window, if it did, and for the depths it did not, how the depths compared at the nearest size that
                # knows them, this one first (rather than every depth explored again)
                costs = self._costs_at(size, ChainDepth.measured)
                nearest = sorted({other for other, _ in self.depths},
                                 key=lambda other: (abs(other.bit_length() - size.bit_length()), -other))
                proportions = next(filter(None, (self._costs_at(other, ChainDepth.estimated) for other in nearest)),
                                   None)
            self.depths[size, window] = ChainDepth(self.draft_depth, adaptive=self.adaptive, tokens=self.yields,
                                                   costs=costs, exploration=self.exploration,
                                                   excess=self.seed_excess if replays else None,
                                                   proportions=proportions)
        return self.depths[size, window]

    def _costs_at(self, size: int, costs: Callable[[ChainDepth], dict[int, float]]) -> dict[int, float] | None:
        """Seconds a step by depth at ``size`` sequences (``costs``: ChainDepth.measured or .estimated), over the
        window of the most depths known (the latest of those); None where none is."""
        known = [costs(choice) for (other, _), choice in self.depths.items() if other == size]
        return max(reversed(known), key=len, default=None) or None

    def _can_draft(self, active: list[Sequence]) -> bool:
        """Greedy members only, each with room in its row for the deepest chain, and one at least with a drafter
        state."""
        return (self.drafts is not None and any(s.drafted is not None for s in active)
                and all(s.generator is None and s.length + self.draft_depth + 1 <= self.capacity for s in active))

    @torch.no_grad()  # not inference mode: the chains it drafts are the forward's inputs, which are ordinary
    def _drafted_step(self, active: list[Sequence], depth: int, window: int) -> list[list[int]]:
        """Every member drafts a chain of ``depth`` tokens from its newest one, one forward verifies them all, and
        each keeps its longest correct run of drafts and the base's token after it, attending over ``window`` slots:
        one capture per rows bucket, window and depth (``_chain_forward``), idle rows padded as in a plain step."""
        start = time.perf_counter()
        self._catch_up(active)
        self.counts.catch_up_seconds += time.perf_counter() - start
        rows = self._rows(len(active))
        key = ("chains", rows, window, depth)
        with announced(self.decoder, self._compiled_shape(rows, depth), first=not self.runner.can_run(key)):
            read = self.runner.run(key, functools.partial(self._chain_forward, window, depth),
                                   *self._chain_inputs(active, rows))
        out = []
        for sequence, row in zip(active, read.tolist()):  # the step's one read
            count = row[-1]
            sequence.length += count + 1
            sequence.drafted = sequence.length if sequence.drafted is not None else None
            sequence.next_token = row[-2]
            out.append(row[:count] + [row[-2]])
        return out

    def _plain_inputs(self, active: list[Sequence], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_plain_forward``'s inputs for ``active`` in ``rows`` rows: each row's newest token and its position. Idle
        rows hold no sequence: they read their last slot, which a sequence writes before it reads it."""
        idle = rows - len(active)
        tokens = [[s.next_token] for s in active] + [[0]] * idle
        positions = [[s.length] for s in active] + [[self.capacity - 1]] * idle
        return torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device)

    def _chain_inputs(self, active: list[Sequence], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_chain_forward``'s inputs for ``active`` in ``rows`` rows: each row's two tokens before its newest and
        the newest, its length, whether it has a drafter state. Idle rows draft from the last slots of their row (room
        for the deepest chain), which a sequence writes before it reads them, and none of their drafts is accepted."""
        idle = rows - len(active)
        tokens = [s.tokens_at(s.length - 2, s.length + 1) for s in active] + [[0, 0, 0]] * idle
        lengths = [s.length for s in active] + [self.capacity - self.draft_depth - 1] * idle
        drafted = [s.drafted is not None for s in active] + [False] * idle
        return tuple(torch.tensor(values, device=self.device) for values in (tokens, lengths, drafted))

    def _chain_forward(self, window: int, depth: int, tokens: torch.Tensor, lengths: torch.Tensor,
                       drafted: torch.Tensor) -> torch.Tensor:
        """A drafted step of the first ``len(tokens)`` rows, all on the device (capturable): each row's chain of
        ``depth`` drafts from ``tokens`` (rows, 3: the two tokens before its newest and the newest) at its
        ``lengths``, verified in one forward, accepted greedily (none of it in a row not ``drafted``), and read into
        the drafter's state (the rejected part past the new length, hidden). Returns (rows, depth + 2): the drafts,
        the base's token after the accepted ones, and their count."""
        chain = self._draft_chains(window, depth, tokens, lengths)
        logits, final = self._verify_chains(window, chain, lengths)
        return self._accept_chains(chain, logits, final, tokens, lengths, drafted)

    def _draft_chains(self, window: int, depth: int, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``_chain_forward``'s first part: each row's root and its ``depth`` drafts, (rows, depth + 1)."""
        index = self.cache.row_numbers[:tokens.shape[0]]
        return self.drafts.propose(tokens, lengths, self.hidden[index, lengths - 1], depth,
                                   self.cache.slot_numbers[:window])

    def _verify_chains(self, window: int, chain: torch.Tensor, lengths: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Its second: the base's logits and drafter states after every token of every chain, at the rows' positions."""
        positions = lengths[:, None] + torch.arange(chain.shape[1], device=self.device)
        return self._forward(slice(0, chain.shape[0]), chain, positions, window, decoder=self.decoder)

    def _accept_chains(self, chain: torch.Tensor, logits: torch.Tensor, final: torch.Tensor, tokens: torch.Tensor,
                       lengths: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """Its last: each row's accepted drafts and the base's token after them, with the chain read into the
        drafter's state; (rows, depth + 2) as ``_chain_forward`` returns."""
        accepted, following = greedy_accept_chains(chain, logits, drafted)
        self.drafts.read(self.cache.row_numbers[:chain.shape[0]], torch.cat([tokens[:, :2], chain], 1), final, lengths)
        return torch.cat([chain[:, 1:], following[:, None], accepted[:, None]], 1)

    def _catch_up(self, active: list[Sequence]) -> None:
        """Read into the drafter's state what the base verified since each member's drafter last read (plain
        steps; a prompt is read at its join, ``_read_prompt``): one forward of the drafter's layer for all members
        behind, eagerly (they fall behind only when the batch stops drafting)."""
        behind = [(row, s) for row, s in enumerate(active) if s.drafted is not None and s.drafted < s.length]
        if not behind:
            return
        span = max(s.length - s.drafted for _, s in behind)
        rows = torch.tensor([row for row, _ in behind], device=self.device)
        starts = torch.tensor([s.drafted for _, s in behind], device=self.device)
        tokens = torch.tensor([s.tokens_at(s.drafted - 2, s.drafted + span) for _, s in behind], device=self.device)
        positions = (starts[:, None] + torch.arange(span, device=self.device)).clamp(max=self.capacity - 1)
        self.drafts.read(rows, tokens, self.hidden[rows[:, None], positions], starts)
        for _, sequence in behind:
            sequence.drafted = sequence.length

    def remove(self, sequence: Sequence) -> None:
        """Take ``sequence`` out; the last row moves into its place, so the running rows stay the first ones."""
        row = self.running.index(sequence)
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.move_row(last, row, moved.length)
            if self.drafts is not None:
                self.drafts.move(last, row, moved.drafted or 0)
            with torch.inference_mode():
                self.hidden[row, :moved.length] = self.hidden[last, :moved.length]
            self.running[row] = moved
        self.running.pop()

    def _window(self, extent: int) -> int:
        """The slots attention covers for rows whose positions stay below ``extent``: a power of two."""
        return min(power_of_two_at_least(extent, SMALLEST_WINDOW), self.capacity)

    def _plain_forward(self, window: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A plain step of the first ``len(tokens)`` rows over ``window`` slots: no host read (capturable)."""
        return self._forward(slice(0, tokens.shape[0]), tokens, positions, window, decoder=self.decoder)[0]

    def _forward(self, rows: slice | torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, window: int,
                 logits_to_keep: int | torch.Tensor = 0, decoder: CompiledDecoder | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (rows, kept tokens, vocab) and final hidden states (rows, n, hidden) of ``tokens`` (rows, n) at
        ``positions``, each row attending to its own slots up to its position, within the first ``window``
        (``_window``, from the host's lengths: no device read). ``rows``: a slice of the cache's rows, or their
        indices on the device. ``logits_to_keep``: the last that many tokens (0: all), or the indices of those to
        score. ``decoder``: the compiled decoder stack in place of the model's (a plain vocabulary head, projected
        here), for a step (its rows a symbol, a chain's length too) or a prefill of one row chosen on the device (its
        length a symbol)."""
        attended = self.cache.slot_numbers[:window]
        self.cache.rows, self.cache.slots, self.cache.attended = rows, positions, attended
        allowed = attended[None, None, :] <= positions[:, :, None]
        mask = additive_mask(allowed, self.model.dtype)[0, 0][:, None]  # (rows, 1, n, window)
        inputs = dict(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True)
        allocating = not self.cache.allocated
        if allocating:  # the first forward allocates the KV memory: eagerly, not inside a compilation (which would
            decoder = None  # then be compiled again without the allocation)
        with torch.inference_mode():
            if decoder is not None:
                if isinstance(rows, torch.Tensor):  # a prefill: its tokens, which it attends over
                    decoder.mark_symbol(1, tokens, positions)
                    decoder.mark_symbol(2, mask)
                else:  # a step: its rows, and a drafted chain's length (one compilation for every depth, unless
                    decoder.mark_symbol(0, tokens, positions, mask)  # verify_graphs is "per-depth")
                    if tokens.shape[1] > 1 and self.verify_graphs == "shared":
                        decoder.mark_symbol(1, tokens, positions)
                        decoder.mark_symbol(2, mask)
                # and the slots attended over: any window, as the buffers' sizes are any capacity
                decoder.mark_symbol(3, mask)
                decoder.mark_symbol(0, attended)
                last, final = target.stack_forward(decoder, self.features, **inputs,
                                                   **cache_kwargs(self.model.get_decoder(), self.cache))
                logits = target.vocab_logits(target.kept_states(last, logits_to_keep),
                                             self.model.get_output_embeddings())
            else:
                out = self.model(**inputs, logits_to_keep=logits_to_keep, output_hidden_states=True,
                                 **cache_kwargs(self.model, self.cache))
                final, logits = target.feature_states(out.hidden_states, self.features), out.logits
            # final: (rows, n, hidden x (1 + feature layers)), what a drafter reads
            if self.hidden is None:
                self.hidden = final.new_zeros(self.max_batch, self.capacity, final.shape[-1])
            if allocating and self.decoder is not None:  # one compilation for every batch size and row capacity
                self.decoder.mark_symbol(0, self.cache.row_numbers, *self.cache.buffers)
                self.decoder.mark_symbol(2, *self.cache.buffers)
            self.hidden[self.cache.row_index(final.shape[0])[:, None], positions] = final
        return logits.float(), final

    def progress_of(self, sequence: Sequence) -> Progress:
        """Where ``sequence`` stands, with copies of its KV and final hidden states, so that it can continue alone
        without a prefill (``SpeculativeDecoder.resume``)."""
        progress = sequence.progress()
        if sequence.hidden_kept:  # else the move re-reads its tokens, a prefill
            row, length = self.running.index(sequence), sequence.length
            pairs = [(layer.keys[row:row + 1, :, :length].clone(), layer.values[row:row + 1, :, :length].clone())
                     for layer in self.cache.layers]
            progress.verified_kv = lambda: pairs
            progress.verified_hidden = self.hidden[row, :length].clone()
        return progress

    def _choose(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        """Each sequence's next token from its row of ``logits`` (rows, vocab): the argmax, or a draw by its own
        generator from its own processed distribution, as it would be alone."""
        picks = logits.argmax(-1)
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                probs = target_probs(logits[row:row + 1], sequence.sampling)[0]
                picks[row] = torch.multinomial(probs, 1, generator=sequence.generator)[0]
        return picks.tolist()
