"""The decoding methods a benchmark compares, behind one call: prompt ids in, one timed turn out.

Every method gets the same prompt ids, and is timed the same way: the device is synchronised before the
clock starts and before it stops, so queued GPU work is never counted to the wrong method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache_argument import cache_from_kwargs
from ..generate import SpeculativeDecoder
from ..models import synchronize
from ..text import eos_token_ids

METHODS = ("hf", "hf-compiled", "hf-pld", "ar", "chimera", "medusa")
PLD_TOKENS = 10  # prompt_lookup_num_tokens, as in transformers' documentation and Spec-Bench's PLD runs
# hf-compiled's static cache is sized once for this many prompt tokens plus the new ones, so that later turns
# reuse it (and, on a GPU, its compiled graphs) instead of reallocating and recompiling per length
STATIC_CACHE_PROMPT = 1024


@dataclass
class Turn:
    token_ids: list[int]
    seconds: float
    steps: int  # base forwards, the prefill included
    accept_lengths: list[int] | None  # tokens emitted by each base forward, when known


@dataclass(frozen=True)
class Decoding:
    """Greedy (temperature 0), or sampling at ``temperature`` with no top-k or top-p, seeded per turn."""

    temperature: float = 0.0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


class HFGenerate:
    """transformers' ``generate`` (greedy or sampled), optionally with prompt lookup decoding, or with a static
    cache (``static``): what a transformers user gets from ``cache_implementation="static"``, which on a GPU
    compiles the forward with torch.compile and replays it as CUDA graphs (transformers' own choice: on a CPU it
    stays eager).

    With prompt lookup, a forward pre-hook (a public nn.Module hook) reads the cache length at each base forward:
    the growth between forwards is what each one emitted, so tau and accept lengths come out for it too."""

    def __init__(self, model, tokenizer, prompt_lookup: int | None = None, decoding: Decoding = Decoding(),
                 static: bool = False):
        self.model = model
        self.static = static
        self.decoding = decoding
        self.device = next(model.parameters()).device
        self.eos = sorted(eos_token_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.prompt_lookup = prompt_lookup
        self._starts: list[int | None] = []

    def _record(self, module, args, kwargs):
        cache = cache_from_kwargs(kwargs)
        self._starts.append(cache.get_seq_length() if cache is not None else None)

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Turn:
        x = torch.tensor([prompt_ids], device=self.device)
        options = dict(do_sample=self.decoding.sampled, max_new_tokens=max_new_tokens, eos_token_id=self.eos,
                       pad_token_id=self.pad, temperature=self.decoding.temperature or None, top_p=None,
                       top_k=0 if self.decoding.sampled else None)
        torch.manual_seed(seed)  # generate samples from the global generator
        if self.prompt_lookup:
            options["prompt_lookup_num_tokens"] = self.prompt_lookup
        if self.static:
            options["cache_implementation"] = "static"
        self._starts = []
        # only prompt lookup emits more than one token per forward; plain generate is left without a hook (a
        # hook inside a compiled forward would be traced into it, and could slow the baseline down)
        handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True) if self.prompt_lookup else None
        try:
            synchronize(self.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), **options)
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        finally:
            if handle is not None:
                handle.remove()
        tokens = out[0, len(prompt_ids):].tolist()
        if not self.prompt_lookup:  # the prefill emits the first token, each later forward one more
            return Turn(tokens, seconds, len(tokens), [1] * len(tokens))
        starts = [None if s is None else int(s) for s in self._starts]
        return Turn(tokens, seconds, len(starts), emitted_per_forward(starts, len(prompt_ids), len(tokens)))


def warm_up_static(method: HFGenerate, max_new_tokens: int, prompt_tokens: int = 0) -> None:
    """Size hf-compiled's static cache (and compile its forward, on a GPU) once, outside every timing: one
    generation over a prompt as long as the longest to come (at least STATIC_CACHE_PROMPT tokens), whose cache
    later, shorter calls reuse. A longer prompt later would make transformers build a larger cache and compile
    anew inside a timed turn (55 s, measured on an H200)."""
    prompt = torch.arange(max(STATIC_CACHE_PROMPT, prompt_tokens), device=method.device) % 1000 + 100
    method(prompt.tolist(), max_new_tokens)


def emitted_per_forward(starts: list[int | None], prompt_len: int, new_tokens: int) -> list[int] | None:
    """Forward i is fed the last emitted token at cache position starts[i] (the prefill emits the token at
    position prompt_len), so forward i emitted up to the position the next forward starts from."""
    if not starts or any(s is None for s in starts[1:]):
        return None
    marks = [prompt_len - 1] + list(starts[1:]) + [prompt_len + new_tokens - 1]
    return [b - a for a, b in zip(marks, marks[1:])]


class OurDecoder:
    """Our loop: plain autoregressive (no drafter) or speculative with a drafter and tree."""

    def __init__(self, model, tokenizer, drafter=None, tree="auto", decoding: Decoding = Decoding(),
                 draft_vocab="auto", compile="auto", adaptive: bool = True):
        self.decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=draft_vocab,
                                          compile=compile, adaptive=adaptive)
        self.device = self.decoder.device
        self.decoding = decoding

    @property
    def tree(self):
        return self.decoder.tree.topology

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Turn:
        synchronize(self.device)
        t0 = time.perf_counter()
        result = self.decoder.generate(input_ids=prompt_ids, max_new_tokens=max_new_tokens,
                                       temperature=self.decoding.temperature, seed=seed)
        synchronize(self.device)
        return Turn(result.token_ids, time.perf_counter() - t0, result.steps, list(result.accepted))
