"""The FastAPI application: OpenAI routes over an ``Engine``, with auth, body limits, SSE and metrics.

``create_app`` takes a ready engine so tests can serve a tiny model from a background thread; ``chimera
serve`` builds the engine from the command line and runs the same app under uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ChimeraError
from ..sampling import SamplingConfig
from .engine import Engine, Job, timeout_error
from .metrics import Metrics
from .prompts import Prompter
from .responses import Reply, sse
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, invalid, parse_json, validate

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there
DEADLINE_GRACE_S = 1.0  # the worker enforces the deadline; the loop gives up this much later as a backstop
log = logging.getLogger("uvicorn.error")  # uvicorn's server log (not only errors), configured by `chimera serve`


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds a client may take to send its request body (a stalled one is a 408)
    default_max_tokens: int = 256
    default_temperature: float = 0.0  # OpenAI's default is 1; ours is greedy unless the server says otherwise


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    decoder = engine.decoder
    prompter = Prompter(decoder.tokenizer, decoder.limit, decoder.model.get_input_embeddings().num_embeddings,
                        config.default_max_tokens)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="chimera", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_RequestMetrics, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(invalid(f"invalid request: {exc.errors()[0]['msg']}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    async def authorize(request: Request) -> None:
        check_api_key(request, config.api_key)

    protected = [Depends(authorize)]

    async def read_json(request: Request) -> dict:
        return parse_json(await read_body(request, config.max_body_bytes, config.body_timeout))

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req) -> dict:
        """The request's sampling settings, checked here: whatever can be refused is refused before the first
        byte of a stream is sent."""
        temperature = config.default_temperature if req.temperature is None else float(req.temperature)
        settings = {"temperature": temperature, "top_k": req.top_k or 0,
                    "top_p": 1.0 if req.top_p is None else float(req.top_p), "seed": req.seed}
        try:
            SamplingConfig(**settings)
        except ChimeraError as exc:
            raise invalid(str(exc), str(exc).split()[0]) from None
        return settings

    async def serve(request: Request, req, prompt_ids: list[int], chat: bool, prompt_param: str):
        t0 = time.monotonic()
        stop = req.stop_strings()
        sample = sampling(req)
        limit, param = req.token_limit()
        budget = prompter.budget(prompt_ids, limit, param, prompt_param)
        job = engine.submit(prompt_ids, budget, stop, sample, stream=req.stream)
        reply = Reply(chat, config.model_name, len(prompt_ids))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(job, _stream(job, reply, include_usage, t0), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(request, job, reply))

    async def _next(job: Job):
        remaining = job.deadline + DEADLINE_GRACE_S - time.monotonic()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0))
        except TimeoutError:
            job.cancel()
            return "error", timeout_error(engine.timeout)

    def finished(job: Job, reply: Reply, result) -> None:
        metrics.generation(result.finish_reason, reply.prompt_tokens, result.new_tokens, result.steps)

    async def _collect(request: Request, job: Job, reply: Reply) -> dict:
        """Wait for a non-streaming job's one event ("done" or "error"), polling for a client that left."""
        getter = asyncio.ensure_future(_next(job))
        try:
            while not getter.done():
                await asyncio.wait([getter], timeout=DISCONNECT_POLL_S)
                if not getter.done() and await request.is_disconnected():
                    metrics.generation("cancelled")
                    raise APIError(499, "the client disconnected", code="client_closed")
            kind, value = getter.result()
        finally:
            getter.cancel()
            job.cancel()  # a no-op once the job is done; stops the worker if this handler was abandoned
        if kind == "error":
            metrics.generation(value.code or "error")
            raise value
        finished(job, reply, value)
        return reply.complete(value, job.queue_seconds)

    async def _stream(job: Job, reply: Reply, include_usage: bool, t0: float):
        completed = False
        try:
            first = True
            while True:
                kind, value = await _next(job)
                if reply.chat and first and kind != "error":  # no byte leaves before decoding has begun
                    yield sse(reply.chunk(first=True))
                if kind == "delta":
                    if first:
                        metrics.first_token_after(time.monotonic() - t0)
                        first = False
                    yield sse(reply.chunk(value))
                elif kind == "done":
                    finished(job, reply, value)
                    yield sse(reply.last_chunk(value, job.queue_seconds))
                    if include_usage:
                        yield sse(reply.usage_chunk(value))
                    yield sse("[DONE]")
                    completed = True
                    return
                else:  # headers are sent: the error travels as an event, which OpenAI clients raise
                    metrics.generation(value.code or "error")
                    completed = True
                    yield sse(value.body())
                    return
        finally:
            job.cancel()
            if not completed:
                metrics.generation("cancelled")

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request):
        req = validate(ChatCompletionRequest, await read_json(request))
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        return await serve(request, req, await prompter.chat(messages), True, "messages")

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: Request):
        req = validate(CompletionRequest, await read_json(request))
        check_model(req.model)
        return await serve(request, req, await prompter.text(req.prompt), False, "prompt")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": int(metrics.started), "owned_by": "chimera"}

    @app.get("/v1/models", dependencies=protected)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=protected)
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        return health_of(app)

    @app.get("/metrics", dependencies=protected)
    async def prometheus():
        return PlainTextResponse(metrics_of(app), media_type=PROMETHEUS_TEXT)

    return app


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (no key configured: anyone)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def health_of(app: FastAPI) -> dict:
    """What ``GET /health`` answers for ``create_app``'s application."""
    engine = app.state.engine
    return {"status": "ok", "model": app.state.config.model_name, "queued": engine.queued, "busy": engine.busy,
            "running": engine.running}


def metrics_of(app: FastAPI) -> str:
    """What ``GET /metrics`` answers for ``create_app``'s application (Prometheus text)."""
    engine = app.state.engine
    return app.state.metrics.render(engine.queued, engine.busy, engine.running, engine.tokens_per_s(), engine.spent)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body, at most ``limit`` bytes (413 past it) arriving within ``timeout`` seconds (408)."""
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        log.info("a client took over %gs to send its request body: answered 408", timeout)
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    except ClientDisconnect:  # a normal event: nobody is left to answer, and it is no server error
        log.info("a client disconnected while sending its request body")
        raise APIError(499, "the client disconnected", code="client_closed") from None
    return bytes(body)


class _JobStream(StreamingResponse):
    """Cancels its job however the response ends, even when the client leaves before the first chunk
    (an async generator that never started never runs its ``finally``)."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class _RequestMetrics:
    """Pure ASGI middleware: counts every HTTP request by route and status, and times it to the last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = 500
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models/{name}" if path.startswith("/v1/models/") else "other")

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.request(route, status, time.monotonic() - t0)
