"""Requests → prompt token ids and a token budget, checked against the context before anything is queued.

Tokenizing here (not in the worker) lets a prompt over the context fail with a 400 at once instead of after
waiting in the queue. A private copy of the tokenizer is used under a lock: a fast tokenizer shared with the
worker thread can fail with "Already borrowed" when two threads use it at the same time.
"""

from __future__ import annotations

import asyncio
import copy
import threading

from ..errors import ChimeraError
from ..text import encode_prompt
from .schemas import APIError, invalid


class Prompter:
    def __init__(self, tokenizer, context: int, vocab_size: int, default_max_tokens: int):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.context = context
        self.vocab_size = vocab_size
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()

    def _encode(self, prompt, raw: bool, param: str) -> list[int]:
        with self._lock:
            try:
                return encode_prompt(self.tokenizer, prompt, raw=raw)
            except ChimeraError as exc:
                raise invalid(str(exc), param) from None

    async def chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.to_thread(self._encode, messages, False, "messages")

    async def text(self, prompt) -> list[int]:
        """A completion prompt: a string, a one-string list, or token ids; no chat template."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise invalid(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt")
            return list(prompt)
        if isinstance(prompt, list):
            prompt = prompt[0]
        return await asyncio.to_thread(self._encode, prompt, True, "prompt")

    def budget(self, prompt_ids: list[int], max_tokens: int | None, param: str, prompt_param: str) -> int:
        """The number of new tokens to generate: what was asked, or the default clipped to the context."""
        room = self.context - len(prompt_ids)
        if room <= 0:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.context} "
                                "tokens", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return min(self.default_max_tokens, room)
        if max_tokens <= 0:
            raise invalid(f"{param} must be a positive integer, got {max_tokens}", param)
        if max_tokens > room:
            raise APIError(400, f"the model's context is {self.context} tokens: {len(prompt_ids)} in the prompt "
                                f"leave room for {room} new tokens, but {param} is {max_tokens}",
                           param=param, code="context_length_exceeded")
        return max_tokens
