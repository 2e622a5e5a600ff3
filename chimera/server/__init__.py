"""``chimera serve``: an OpenAI-compatible HTTP server over one ``SpeculativeDecoder``."""

from .app import ServerConfig, create_app
from .engine import Engine
from .run import BackgroundServer, serve_forever

__all__ = ["BackgroundServer", "Engine", "ServerConfig", "create_app", "serve_forever"]
