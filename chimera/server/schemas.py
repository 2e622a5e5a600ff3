"""Request bodies of the OpenAI API, validated strictly, and OpenAI-shaped errors.

Strict pydantic models turn every malformed request into one ``APIError`` that names the offending field,
so the handlers only ever see well-typed requests. Unknown fields are refused (as OpenAI does) so that a typo
such as ``temprature`` is reported instead of silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .. import inputs
from ..errors import ChimeraError

MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# The numeric fields accept JSON integers and floats but never booleans or strings.
Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None  # accepted, not used by chat templates

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ResponseFormat(_Strict):
    type: StrictStr


class _Common(_Strict):
    """Fields shared by chat and text completions."""

    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # our extension; 0 = off
    seed: StrictInt | None = None
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None  # harmless: accepted and ignored
    metadata: dict | None = None
    service_tier: StrictStr | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, reason) for every field set to something this server cannot honour."""
        out = []
        if self.n not in (None, 1):
            out.append(("n", "only n=1 is supported"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                out.append((name, f"{name} changes the model's distribution and is not supported; use 0"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed with stream=true"))
        return out

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stops:
            if len(s) > MAX_STOP_LENGTH:
                raise invalid(f"each stop string must be at most {MAX_STOP_LENGTH} characters", "stop")
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    tool_choice: StrictStr | dict | None = None
    functions: list | None = None
    function_call: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs:
            out.append(("logprobs", "logprobs are not supported"))
        if self.top_logprobs is not None:
            out.append(("top_logprobs", "top_logprobs are not supported"))
        for name in ("tools", "functions"):
            if getattr(self, name):
                out.append((name, f"{name} (function calling) are not supported"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                out.append((name, f"{name} is not supported"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", "only response_format {'type': 'text'} is supported"))
        return out

    def token_limit(self) -> tuple[int | None, str]:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise invalid("max_tokens and max_completion_tokens disagree: give one of them", "max_tokens")
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Common):
    prompt: (StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
             | Annotated[list[StrictInt], Field(min_length=1)])
    max_tokens: StrictInt | None = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            out.append(("prompt", "batched prompts are not supported: send one prompt per request"))
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.logprobs:
            out.append(("logprobs", "logprobs are not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            out.append(("suffix", "suffix (insertion) is not supported"))
        return out

    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


def parse_json(body: bytes) -> dict:
    """Raw request bytes → a JSON object (inputs.parse_json: UTF-8, depth, no lone surrogates), or a 400."""
    if not body.strip():
        raise invalid("the request body is empty: send a JSON object")
    try:
        data = inputs.parse_json(body, "the request body")
    except ChimeraError as exc:
        raise invalid(str(exc)) from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def validate(model: type[_Common], data: dict) -> _Common:
    """A JSON object → a request model; the first validation error becomes a 400 naming its field."""
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = inputs.field_path(error) or None
        if error["type"] == "extra_forbidden":
            raise invalid(f"unrecognized request argument supplied: {param}", param) from None
        if error["type"] == "missing":
            raise invalid(f"missing required field: {param}", param) from None
        raise invalid(f"invalid value for {param}: {error['msg']}", param) from None
    for name, reason in request.unsupported():
        raise invalid(reason, name, "unsupported_parameter")
    return request
