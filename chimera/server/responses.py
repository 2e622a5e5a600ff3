"""OpenAI response objects for chat and text completions, whole or as server-sent-event chunks.

``Reply`` knows which of the two APIs it answers, so the handlers run one code path for both.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..generate import GenerationResult


def stats(result: GenerationResult, queue_seconds: float) -> dict:
    """Our own per-response numbers, in an extra ``chimera`` field that OpenAI clients ignore."""
    return {"tau": round(result.tau, 4), "steps": result.steps, "seconds": round(result.seconds, 4),
            "tokens_per_s": round(result.tokens_per_s, 2), "queue_seconds": round(queue_seconds, 4)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Reply:
    chat: bool
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, obj: str, choice: dict) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def complete(self, result: GenerationResult, queue_seconds: float) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
        else:
            choice["text"] = result.text
        body = self._envelope("chat.completion" if self.chat else "text_completion", choice)
        body["usage"] = usage(self.prompt_tokens, result.new_tokens)
        body["chimera"] = stats(result, queue_seconds)
        return body

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choice)

    def last_chunk(self, result: GenerationResult, queue_seconds: float) -> dict:
        body = self.chunk(finish_reason=result.finish_reason)
        body["chimera"] = stats(result, queue_seconds)
        return body

    def usage_chunk(self, result: GenerationResult) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", {})
        body["choices"] = []
        body["usage"] = usage(self.prompt_tokens, result.new_tokens)
        return body
