"""Plain decoding of a running batch: sequences join after their prefill and leave when they stop, and every step
decodes one token of each in a single forward (continuous batching).

A lone request is served faster by speculation (generate.py); many at once are served faster together: the
forward reads the weights once for the whole batch, so on a small model a step of 16 sequences costs little more
than a step of one. The server (server/engine.py) runs this batch whenever more than one request is in flight.

Each sequence keeps what makes its output its own: its KV row, its length, its sampling settings and seeded
generator, its stop condition. Every sequence of a batch decodes token for token what it decodes alone in
float32 (greedy, and sampled with a seed: the same draws in the same order; tests/test_batch.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cache import RowSlotCache
from .cache_argument import cache_kwargs
from .errors import ChimeraError
from .generate import GenerationResult, Progress
from .graph_runner import power_of_two_at_least
from .models import context_limit
from .sampling import SamplingConfig, target_probs
from .text import StopCondition, eos_token_ids, stop_condition
from .tree import additive_mask

SMALLEST_WINDOW = 64  # attention covers a power-of-two number of slots, so a few shapes serve every length


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

    @property
    def done(self) -> bool:
        return self.stopper.done

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

    def __init__(self, model, tokenizer, max_batch: int, capacity: int | None = None):
        if max_batch < 1:
            raise ChimeraError(f"the batch size must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.capacity = min(capacity or context_limit(model), context_limit(model))
        self.max_batch = max_batch
        self.cache = RowSlotCache(model.config.get_text_config().num_hidden_layers, max_batch, self.capacity,
                                  self.device)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.running: list[Sequence] = []  # row i holds running[i]
        self.hidden: torch.Tensor | None = None  # (max_batch, capacity, hidden) final hidden states, on first use

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
        """``known`` tokens into the next free row for ``sequence``, which joins the batch; the last one's logits."""
        row, n = len(self.running), len(known)
        positions = torch.arange(n, device=self.device)[None]
        logits = self._forward(slice(row, row + 1), torch.tensor([known], device=self.device), positions, n,
                               logits_to_keep=1)
        sequence.length = n
        self.running.append(sequence)
        return logits

    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every running sequence that has not stopped; (sequence, new text) for each."""
        active = [s for s in self.running if not s.done]
        if not active:
            return []
        if len(active) != len(self.running):
            raise ChimeraError("remove finished sequences before the next step")
        count = len(active)
        tokens = torch.tensor([[s.next_token] for s in active], device=self.device)
        positions = torch.tensor([[s.length] for s in active], device=self.device)
        logits = self._forward(slice(0, count), tokens, positions, max(s.length for s in active) + 1)
        chosen = self._choose(logits[:, -1], active)
        out = []
        for sequence, token in zip(active, chosen):
            sequence.length += 1
            sequence.next_token = token
            emitted = len(sequence.stopper.tokens)
            out.append((sequence, sequence.stopper.push_step([token])))
            sequence.accepted.append(len(sequence.stopper.tokens) - emitted)
        return out

    def remove(self, sequence: Sequence) -> None:
        """Take ``sequence`` out; the last row moves into its place, so the running rows stay the first ones."""
        row = self.running.index(sequence)
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.move_row(last, row, moved.length)
            with torch.inference_mode():
                self.hidden[row, :moved.length] = self.hidden[last, :moved.length]
            self.running[row] = moved
        self.running.pop()

    def _forward(self, rows: slice, tokens: torch.Tensor, positions: torch.Tensor, extent: int,
                 logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (rows, kept tokens, vocab) of ``tokens`` (rows, n) at ``positions``, each row attending to its own
        slots up to its position; ``extent`` (from the host's lengths, no device read) bounds every row's slots."""
        window = min(power_of_two_at_least(extent, SMALLEST_WINDOW), self.capacity)
        self.cache.rows, self.cache.slots, self.cache.window = rows, positions, window
        allowed = torch.arange(window, device=self.device)[None, None, :] <= positions[:, :, None]
        mask = additive_mask(allowed, self.model.dtype)[0, 0][:, None]  # (rows, 1, n, window)
        with torch.inference_mode():
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                             logits_to_keep=logits_to_keep, output_hidden_states=True,
                             **cache_kwargs(self.model, self.cache))
            final = out.hidden_states[-1]  # (rows, n, hidden): what a drafter reads, kept for a move out
            if self.hidden is None:
                self.hidden = final.new_zeros(self.max_batch, self.capacity, final.shape[-1])
            self.hidden[rows].scatter_(1, positions[:, :, None].expand(-1, -1, final.shape[-1]), final)
        return out.logits.float()

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
