"""One prompt decoded plainly and speculatively, side by side: what ``make demo`` shows a newcomer.

Both runs go through our loop on the same model (the plain one with no drafter), greedy, after one short
untimed warm-up each, so that one-time costs (packing weights, capturing graphs, first allocations) land
in neither. The texts are compared token for token: in float32 they must be identical (a difference is a
bug, reported as an error); in bfloat16 or float16 a tree forward and a one-token forward may round
differently (see docs/benchmarks.md), so a difference there is reported, not treated as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generate import GenerationResult, SpeculativeDecoder

WARMUP_TOKENS = 8


@dataclass
class Comparison:
    plain: GenerationResult
    speculative: GenerationResult
    dtype: torch.dtype
    setup: str = ""  # how the speculative decoder was set up (its calibration, where one ran)

    @property
    def identical(self) -> bool:
        return self.plain.token_ids == self.speculative.token_ids

    @property
    def speedup(self) -> float:
        return self.speculative.tokens_per_s / self.plain.tokens_per_s if self.plain.tokens_per_s else 0.0

    @property
    def must_be_identical(self) -> bool:
        return self.dtype == torch.float32

    def to_dict(self) -> dict:
        return {"plain": self.plain.to_dict(), "speculative": self.speculative.to_dict(),
                "identical": self.identical, "speedup": round(self.speedup, 3), "dtype": str(self.dtype),
                "setup": self.setup}

    def table(self) -> str:
        rows = [("plain decoding", self.plain), ("speculative", self.speculative)]
        lines = [self.setup] if self.setup else []
        lines += [f"{'':16}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'tokens/forward':>16}"]
        lines += [f"{name:16}{r.new_tokens:>8}{r.seconds:>9.2f}{r.tokens_per_s:>10.1f}{r.tau:>16.2f}"
                  for name, r in rows]
        verdict = "identical" if self.identical else "DIFFERENT"
        lines.append(f"speculative decoding: {self.speedup:.2f}x the speed of plain decoding, {verdict} text")
        s = self.speculative
        if s.plain_steps:
            lines.append(f"(the drafter sat out {s.plain_steps} of {s.steps - 1} steps, where its accepted tokens "
                         "did not pay for its cost)")
        if not self.identical and not self.must_be_identical:
            lines.append(f"({self.dtype}: a tree forward and a one-token forward may round differently)")
        return "\n".join(lines)


def compare(model, tokenizer, drafter, prompt: str, max_new_tokens: int, tree="auto", draft_vocab="auto",
            stop=(), raw: bool = False, on_text=None, compile="auto") -> Comparison:
    """Plain, then speculative decoding of ``prompt``; ``on_text`` receives the speculative run's text as it
    streams."""
    plain = SpeculativeDecoder(model, tokenizer, None, compile=compile)
    speculative = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=draft_vocab, compile=compile)
    for decoder in (plain, speculative):
        decoder.generate(prompt, max_new_tokens=WARMUP_TOKENS, stop=stop, raw=raw)
    plain_result = plain.generate(prompt, max_new_tokens=max_new_tokens, stop=stop, raw=raw)
    stream = speculative.stream(prompt, max_new_tokens=max_new_tokens, stop=stop, raw=raw)
    for chunk in stream:
        if on_text is not None:
            on_text(chunk)
    setup = f"calibration: {speculative.calibration.describe()}" if speculative.calibration is not None else ""
    return Comparison(plain_result, stream.result, model.dtype, setup)
