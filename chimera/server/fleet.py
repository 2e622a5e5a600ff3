"""A serving fleet on Ray Serve: replicas of ``chimera serve``'s engine behind one OpenAI-compatible endpoint.

Ray Serve places the replicas (one GPU each, or CPU cores here), routes each request to the least busy one,
restarts a replica that dies and scales their number on queue depth. We add no scheduler of our own, only
two deployments:

- ``EngineReplica`` runs the very application ``chimera serve`` runs (app.py over one engine), called in
  process with the client's method, path, headers and body, and streams its ASGI messages back. API,
  errors, streaming, auth and metrics are therefore those of ``chimera serve``, by construction.
- ``Front``, the ingress, reads the body (with the server's size and time limits), sends it to a replica
  and relays the answer. It holds the answer back until its first body bytes exist: a replica that dies
  before then (while the request waited in its engine, during the prefill, or before a non-streaming
  answer was complete) costs the client nothing, the request is sent again to another replica. Once bytes
  have left, a dying replica ends the stream with an OpenAI error event (clients raise it). A chat stream's
  first chunk leaves with its first token (app.py), so "started" means decoding had begun.

Each replica's engine admits at most ``max_batch`` requests (Ray's ``max_ongoing_requests``): what waits,
waits in Ray's queue in front of all replicas, not inside one that may die, and more than ``max_queue``
waiting requests are refused with 429 as ``chimera serve`` does. ``/metrics`` and ``/health`` ask every
replica (Ray's ``broadcast``): every replica's metrics in one scrape, each sample labelled with its replica,
and the health of each. Every other answer names its replica in the header ``X-Chimera-Replica``.

Measured on this CPU (docs/fleet.md): 2 one-core replicas against 1, and a replica killed under load.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import suppress
from dataclasses import dataclass

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .app import PROMETHEUS_TEXT, ServerConfig, check_api_key, create_app, health_of, metrics_of, read_body
from .engine import timeout_error
from .responses import sse
from .run import EngineOptions, build_engine
from .schemas import APIError

log = logging.getLogger("chimera.server")
ATTEMPTS = 3  # replicas a request is sent to before the front gives up (each failure is a dead replica)
REPLICA_HEADER = b"x-chimera-replica"


@dataclass(frozen=True)
class FleetOptions:
    """How many replicas, what each holds, and when Ray adds or removes one."""

    replicas: int = 1
    max_replicas: int | None = None  # above ``replicas``: autoscaled between the two on queue depth
    target_ongoing_requests: float | None = None  # per replica, for autoscaling (default: half its batch)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    threads: int | None = None  # torch threads in a CPU replica (default: its CPUs, at least 1)

    def deployment_options(self, max_batch: int, max_queue: int) -> dict:
        options = {"max_ongoing_requests": max_batch, "max_queued_requests": max_queue,
                   "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
                   "health_check_period_s": 5}
        if self.max_replicas and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas, "initial_replicas": self.replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or max(1.0, max_batch / 2)}
        else:
            options["num_replicas"] = self.replicas
        return options


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the front received it, sent whole to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
                "client": self.client, "server": None}


class EngineReplica:
    """One engine and ``chimera serve``'s application over it, in a Ray actor."""

    def __init__(self, options: EngineOptions, config: ServerConfig, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.engine = build_engine(options)
        self.app = create_app(self.engine, config)
        self.engine.start()
        self.name = serve.get_replica_context().replica_id.unique_id.encode()

    def metrics(self) -> tuple[str, str]:
        """This replica's name and its ``/metrics`` text."""
        return self.name.decode(), metrics_of(self.app)

    def health(self) -> tuple[str, dict]:
        return self.name.decode(), health_of(self.app)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine thread has died."""
        if not self.engine.alive:
            raise RuntimeError("the engine's worker thread is not running")

    async def forward(self, request: ForwardedRequest):
        """The application's ASGI messages for ``request`` as they are sent, in lists of those ready together
        (under load a list carries several; each list is one object through Ray). If the caller goes away, the
        application sees its client disconnect and the request's generation is cancelled."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name)]}
            messages.put_nowait(message)

        app = asyncio.ensure_future(self.app(request.scope(), receive, send))
        app.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            ended = False
            while not ended:
                ready = [await messages.get()]
                while not messages.empty():
                    ready.append(messages.get_nowait())
                if None in ready:
                    ready, ended = ready[:ready.index(None)], True
                if ready and ready[-1]["type"] == "http.response.body" and not ready[-1].get("more_body", False):
                    ended = True
                if ready:
                    yield ready
        finally:
            gone.set()
            app.cancel()  # a no-op when it has finished; else its handlers' cleanup cancels the generation
            with suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(app, 5)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class Front:
    """The ingress: limits on the body, a replica for the request, another one if that replica dies before
    the answer's first bytes."""

    def __init__(self, replicas, config: ServerConfig, timeout: float, max_queue: int):
        self.every_replica = replicas  # for /metrics and /health
        self.replicas = replicas.options(stream=True)
        self.config = config
        self.timeout = timeout
        self.max_queue = max_queue

    async def __call__(self, request: Request) -> Response:
        try:
            if request.method == "GET" and request.url.path in ("/metrics", "/health"):
                return await self.fleet_view(request)
            body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout)
            forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                         tuple(request.scope["headers"]), body, request.scope.get("client"))
            return await self.dispatch(forwarded)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def fleet_view(self, request: Request) -> Response:
        """``/metrics``: every replica's samples, labelled by replica; ``/health``: each replica's, and "ok"
        while at least one answers."""
        metrics = request.url.path == "/metrics"
        if metrics:
            check_api_key(request, self.config.api_key)
        try:
            answers = await self.every_replica.broadcast("metrics" if metrics else "health").results_async(
                timeout_s=10, return_exceptions=True)
        except TimeoutError:
            raise APIError(504, "the replicas did not all answer within 10 s", type="server_error",
                           code="timeout") from None
        except Exception as exc:  # noqa: BLE001 - no replica to ask yet (deploying) or any more: say so
            raise APIError(503, f"no replica is ready: {type(exc).__name__}", type="server_error",
                           code="no_replica") from None
        answered = [a for a in answers if not isinstance(a, BaseException)]
        if metrics:
            return PlainTextResponse(merge_metrics(answered), media_type=PROMETHEUS_TEXT)
        replicas = dict(answered)
        totals = {key: sum(h[key] for h in replicas.values()) for key in ("queued", "running")}
        return JSONResponse({"status": "ok" if replicas else "unavailable", "model": self.config.model_name,
                             **totals, "replicas": replicas, "unreachable": len(answers) - len(answered)},
                            status_code=200 if replicas else 503)

    async def dispatch(self, request: ForwardedRequest) -> Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for attempt in range(1, ATTEMPTS + 1):
            stream = self.replicas.forward.remote(request)
            messages = one_by_one(stream)
            try:
                async with asyncio.timeout_at(deadline):
                    start, held = await first_bytes(messages)
            except TimeoutError:
                stream.cancel()
                raise timeout_error(self.timeout) from None
            except BackPressureError:
                raise APIError(429, f"the fleet is busy: {self.max_queue} requests are already waiting; retry "
                                    "later", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            except RayActorError as exc:
                log.warning("a replica stopped before answering (%s); sending the request to another (attempt "
                            "%d of %d)", type(exc).__name__, attempt + 1, ATTEMPTS)
                continue
            return Relay(start, held, messages, stream)
        raise APIError(503, f"no replica could take the request ({ATTEMPTS} stopped before answering)",
                       type="server_error", code="no_replica")


def merge_metrics(parts: list[tuple[str, str]]) -> str:
    """Prometheus texts of several replicas as one: each sample gains the label ``replica``, and each metric
    family appears once, its HELP and TYPE lines then every replica's samples (the format wants a family's
    lines together). Sum or compare across replicas with PromQL."""
    headers: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines, in order of first appearance
    samples: dict[str, list[str]] = {}
    for name, text in sorted(parts):
        label, family = f'replica="{name}"', ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                known = headers.setdefault(family, [])
                if line not in known:
                    known.append(line)
                continue
            if not line.strip() or line.startswith("#"):
                continue
            metric, _, value = line.partition(" ")
            metric = metric.replace("{", "{" + label + ",", 1) if "{" in metric else f"{metric}{{{label}}}"
            samples.setdefault(family, []).append(f"{metric} {value}")
    families = list(headers) + [f for f in samples if f not in headers]
    return "".join(line + "\n" for family in families for line in headers.get(family, []) + samples.get(family, []))


async def one_by_one(stream):
    """A replica's lists of messages, one message at a time."""
    async for ready in stream:
        for message in ready:
            yield message


async def first_bytes(messages) -> tuple[dict, list[dict]]:
    """The response's start message and its body messages up to the first bytes (or its end)."""
    start = await anext(messages)
    held = []
    async for message in messages:
        held.append(message)
        if message.get("body") or not message.get("more_body", False):
            break
    else:
        held.append({"type": "http.response.body", "body": b"", "more_body": False})
    return start, held


class Relay(Response):
    """A replica's answer passed on as it comes; a replica dying mid-stream ends it with an error event."""

    def __init__(self, start: dict, held: list[dict], messages, stream):
        self.status_code = start["status"]
        self.raw_headers = list(start.get("headers", []))
        self.background = None
        self.held = held
        self.messages = messages  # the rest of ``stream``'s messages
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for message in self.held:
                await send(message)
            if self.held[-1].get("more_body", False):
                try:
                    async for message in self.messages:
                        await send(message)
                except RayActorError as exc:
                    log.warning("a replica stopped mid-answer (%s): the stream ends with an error event",
                                type(exc).__name__)
                    error = APIError(503, "the replica serving this request stopped; retry the request",
                                     type="server_error", code="replica_stopped")
                    await send({"type": "http.response.body", "body": sse(error.body()).encode(),
                                "more_body": False})
        finally:
            self.stream.cancel()


def application(options: EngineOptions, config: ServerConfig, fleet: FleetOptions):
    """The Ray Serve application: ``fleet.replicas`` engine replicas behind one front."""
    device_is_gpu = fleet.gpus_per_replica > 0
    threads = fleet.threads or (None if device_is_gpu else max(1, int(fleet.cpus_per_replica)))
    replica = serve.deployment(name="chimera-replica",
                               **fleet.deployment_options(options.max_batch, options.max_queue))(EngineReplica)
    front = serve.deployment(name="chimera-front", num_replicas=1, max_ongoing_requests=100_000,
                             ray_actor_options={"num_cpus": 0})(Front)
    return front.bind(replica.bind(options, config, threads), config, options.timeout, options.max_queue)


def run(options: EngineOptions, config: ServerConfig, fleet: FleetOptions, host: str, port: int,
        address: str | None = None, block: bool = True) -> str:
    """Connect to the Ray cluster at ``address`` (none: start one on this machine), deploy the fleet and
    serve it on ``host:port``; returns the endpoint's URL (blocks until Ctrl-C or SIGTERM when ``block``,
    then takes the fleet down)."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(options, config, fleet), name="chimera", route_prefix="/")
    url = f"http://{host}:{port}"
    if not block:
        return url
    print(f"chimera: serving {config.model_name!r} from {fleet.replicas} replicas on {url} (OpenAI API under /v1; "
          "Ctrl-C stops the fleet)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("chimera: stopping the fleet", flush=True)
    finally:
        serve.delete("chimera")
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return url


def app_builder(args: dict):
    """For Ray's own command: ``serve run chimera.server.fleet:app_builder model=smollm2 replicas=2 ...``
    (the names are ``chimera fleet``'s options, checked the same way)."""
    from ..cli import build_parser, fleet_settings

    argv = ["fleet"]
    for name, value in args.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    options, config, fleet = fleet_settings(build_parser().parse_args(argv))
    return application(options, config, fleet)
