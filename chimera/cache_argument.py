"""The name under which a model's forward takes its KV cache, across the transformers versions we meet.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name still works there,
with a FutureWarning, until 5.40); 5.17, the GPU machine's, knows only ``past_key_values``. We read the name off
the forward's signature once per module class (``inspect.signature`` follows the deprecation wrapper to the real
parameters), never per forward, and pass the cache under it: no warning from our own calls, nothing silenced.
"""

from __future__ import annotations

import functools
import inspect

CACHE_NAMES = ("cache", "past_key_values")  # the new name first


@functools.cache
def _name_for(forward) -> str:
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), "past_key_values")


def cache_argument_name(module) -> str:
    """'cache' or 'past_key_values': what ``module.forward`` (a transformers model or decoder) calls its cache."""
    return _name_for(type(module).forward)


def cache_kwargs(module, cache) -> dict:
    """``{name: cache}`` for ``module(**inputs, **cache_kwargs(module, cache))``."""
    return {cache_argument_name(module): cache}


def cache_from_kwargs(kwargs: dict):
    """The cache a forward was given, under either name (for hooks that read a forward's arguments)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
