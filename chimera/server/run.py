"""Start a server: from the command line (blocking) or in a background thread (tests, the load script).

``EngineOptions`` says what one server decodes with; ``build_engine`` is the one way from it to a running
engine, for ``chimera serve`` and for each replica of a fleet (fleet.py). The listening socket is bound here,
before uvicorn starts, so a busy port fails with one clear line and port 0 yields a real port that can be
printed.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..errors import ChimeraError
from .app import ServerConfig, create_app
from .engine import Engine


# The running batch when none is given, on a CPU and a GPU alike. On a GPU it was 1 before session 16: the batch's
# plain step was graphed but not compiled, and one request at a time served more (886 tokens/s on an H100, against
# 459 and 685 at 4 and 16 clients). With the step compiled and the prefills captured, `ar` served 865, 1,251, 2,675
# and 3,478 tokens/s at 1, 4, 16 and 64 clients (docs/benchmarks.md, session 16). 16 rows of 2,048 tokens keep the
# KV memory of an 8B Llama shape at 4 GB.
DEFAULT_MAX_BATCH = 16


@dataclass(frozen=True)
class EngineOptions:
    """What one engine decodes with: the model, its drafter, and the engine's limits (``chimera serve``'s
    options of the same names)."""

    model: str
    dtype: str = "float32"
    device: str = "auto"
    drafter: str = "auto"
    tree: str = "auto"
    draft_vocab: object = "auto"
    compile: str = "auto"
    max_queue: int = 16
    timeout: float = 120.0
    max_batch: int = DEFAULT_MAX_BATCH
    batch_context: int = 2048
    batch_drafting: bool = False  # the running batch drafts too (batch.py)


WARM_UP_NEW_TOKENS = 256  # the new tokens a request is assumed to ask for when the GPU's captures are made ahead


def build_engine(options: EngineOptions) -> Engine:
    """Load the model and drafter and make the engine (not started). On a GPU the graphs are captured (and the
    forward compiled) here, before the first request, not inside it."""
    from ..compiled import COMPILE_CHOICES
    from ..drafters import resolve_drafter
    from ..generate import SpeculativeDecoder
    from ..models import load_base

    model, tokenizer = load_base(options.model, dtype=options.dtype, device=options.device)
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter(options.drafter, model), tree=options.tree,
                                 draft_vocab=options.draft_vocab, compile=COMPILE_CHOICES[options.compile])
    if decoder.device.type == "cuda":  # every cache size and prompt length bucket of requests within the batch's
        decoder.warm_up(options.batch_context, WARM_UP_NEW_TOKENS)  # context, captured before the first request
    engine = Engine(decoder, max_queue=options.max_queue, timeout=options.timeout, max_batch=options.max_batch,
                    batch_context=options.batch_context, batch_drafting=options.batch_drafting)
    engine.warm_up()  # and every shape of the running batch's step (on a GPU)
    return engine


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ChimeraError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ChimeraError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn_server(app, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))


def serve_forever(engine: Engine, config: ServerConfig, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on an already bound socket until interrupted (bind first, so a busy port fails before loading)."""
    app = create_app(engine, config)
    print(f"chimera: serving {config.model_name!r} on {url_of(sock)} (OpenAI API under /v1)", flush=True)
    _uvicorn_server(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """A server on a loopback port in a daemon thread; ``with BackgroundServer(...) as url: ...``."""

    def __init__(self, engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.app = create_app(engine, config)
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(self.app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="chimera-server")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ChimeraError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
