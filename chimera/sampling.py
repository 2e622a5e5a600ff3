"""Sampling settings and the target distribution they define.

Speculative sampling is lossless only with respect to one exact distribution: the one ``model.generate(
do_sample=True, ...)`` draws from after its logits warpers. So we build that distribution with transformers'
own warpers, in the order ``GenerationMixin._get_logits_processor`` (transformers 5.x) appends them:
temperature, then top-k, then top-p, each added only when it changes anything, with ``min_tokens_to_keep=1``.

Supported: temperature, top-k, top-p. Not supported (and not accepted by the API): repetition penalty,
min-p, typical-p, epsilon/eta cutoffs, any custom logits processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import ChimeraError

_MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
# The smallest temperature that samples: below about 1e-38 dividing float32 logits by it overflows to inf (and
# the probabilities to NaN), and far above that, at 1e-4, sampling is already greedy decoding for any logit gap
# over 0.01 (the runner-up has probability below exp(-100)). Smaller positive values are refused with a clear
# error rather than silently treated as greedy: temperature 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy decoding (top_k and top_p are then ignored); top_k 0 and top_p 1 mean off.

    Unlike ``generate``, an unset top_k is off, not 50: chimera applies exactly what it is given.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ChimeraError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise ChimeraError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ChimeraError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:  # also rejects NaN
            raise ChimeraError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}")
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _MAX_SEED):
            raise ChimeraError(f"seed must be an integer in [0, 2**64) or None, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @cached_property
    def warpers(self) -> tuple:
        """The warpers ``generate(do_sample=True, temperature=, top_k=, top_p=)`` would apply, in its order.
        Built once per request and called directly (``LogitsProcessorList`` inspects signatures every call)."""
        out = []
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k != 0:
            out.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=float(self.top_p), min_tokens_to_keep=1))
        return tuple(out)

    def generator(self, device) -> torch.Generator:
        """The one source of randomness for a request: seeded when a seed is given, else from the OS."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def target_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Base logits (n, vocab) → processed float32 scores (-inf where a warper removed a token)."""
    scores = logits.float()
    # these three warpers read only the scores; an empty id tensor stands in for the (unused) context
    ids = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    for warper in config.warpers:
        scores = warper(ids, scores)
    return scores


def target_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Base logits (n, vocab) → the distribution each row's next token is sampled from (softmax, as generate)."""
    return torch.softmax(target_logits(logits, config), dim=-1)
