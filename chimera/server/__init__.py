"""``chimera serve``: an OpenAI-compatible HTTP server over one ``SpeculativeDecoder``.

The names below load on first use, so that the engine (``chimera.server.engine``, which ``chimera throughput``
drives) imports without the web stack: the GPU machine has no FastAPI, and its throughput run failed on the import
in session 13."""

import importlib

_HOMES = {"ServerConfig": ".app", "create_app": ".app", "Engine": ".engine", "BackgroundServer": ".run",
          "serve_forever": ".run"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
