"""Prompts in, text out: chat templates, incremental detokenization for streaming, and stop conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ChimeraError


def encode_prompt(tokenizer, prompt, raw: bool = False) -> list[int]:
    """A string (a user turn) or a list of chat messages → token ids, through the chat template unless raw."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ChimeraError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ChimeraError("messages must be a non-empty list of {'role': ..., 'content': str}")
        if not any(m["content"].strip() for m in messages):
            raise ChimeraError("empty prompt: every message is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def text_of(tokenizer):
    """``ids -> text`` (special tokens skipped, spaces as they are): transformers' ``decode``, or, where that only
    forwards to the Rust tokenizer (a fast tokenizer whose class overrides neither ``decode`` nor ``_decode``), the
    Rust tokenizer's own. transformers' argument handling around it cost five times the decoding itself: for a
    running batch of 64 sequences, two decodes a sequence a step, about 0.7 ms of host time a step
    (cProfile on this CPU, transformers 5.24)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another layout of transformers: its decode as it is
        TokenizersBackend = None
    kind = type(tokenizer)
    if (TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend)
            and kind._decode is TokenizersBackend._decode and kind.decode is TokenizersBackend.decode):
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences.

    Decodes a short window (from the last emitted boundary) instead of the whole text at every token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decode = text_of(tokenizer)
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, *token_ids: int) -> str:
        """Add one or more tokens; the text they complete (decoded once, however many there are)."""
        self.tokens.extend(token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):]


def stop_condition(tokenizer, eos_ids: set[int], max_new_tokens: int, room: int, stop) -> "StopCondition":
    """A request's end, checked: at most ``max_new_tokens`` (a positive integer) and the ``room`` left in the
    context; ``stop`` a string or strings (empty ones ignored)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ChimeraError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or ()) if s)
    return StopCondition(tokenizer, eos_ids, min(max_new_tokens, room), stop)


@dataclass
class StopCondition:
    """Decides, token by token, when generation ends: EOS, a stop string, or the token budget.

    Both the plain and the speculative loops feed every emitted token through the same object, so a stop
    that falls in the middle of an accepted draft path ends generation at exactly the same token.
    """

    tokenizer: object
    eos_ids: set[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def __post_init__(self):
        self._decoder = IncrementalDecoder(self.tokenizer)
        self._pending = ""  # decoded text held back because it could be the start of a stop string

    def push(self, token_id: int) -> str:
        """Record one token; return the text it releases (never any part of a stop string)."""
        self.tokens.append(token_id)
        buf = self._pending + self._decoder.push(token_id)
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason:
            buf += self._decoder.flush()
        hits = [buf.find(s) for s in self.stop_strings if s in buf]
        if hits:
            self.finish_reason = "stop"
            release, self._pending = buf[: min(hits)], ""
        elif self.finish_reason:
            release, self._pending = buf, ""
        else:
            held = max((k for s in self.stop_strings for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
            release, self._pending = buf[: len(buf) - held], buf[len(buf) - held:]
        self.text += release
        return release

    def push_step(self, token_ids: list[int]) -> str:
        """Record the tokens of one decoding step, up to where generation ends; return the text they release.

        Without stop strings the step's text is decoded once, not once per token (the end by EOS or budget is
        decided on the ids); with stop strings each token goes through ``push``, which can end between tokens."""
        if self.stop_strings:
            released = []
            for token_id in token_ids:
                released.append(self.push(token_id))
                if self.done:
                    break
            return "".join(released)
        taken = []
        for token_id in token_ids:
            taken.append(token_id)
            if token_id in self.eos_ids:
                self.finish_reason = "stop"
            elif len(self.tokens) + len(taken) >= self.max_new_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        self.tokens.extend(taken)
        release = self._decoder.push(*taken)
        if self.finish_reason:
            release += self._decoder.flush()
        self.text += release
        return release

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

