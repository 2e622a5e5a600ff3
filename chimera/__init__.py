"""chimera: lossless speculative decoding for Hugging Face causal language models."""

from .errors import ChimeraError
from .generate import GenerationResult, SpeculativeDecoder
from .models import DEFAULT_MODEL, load_base


def load_drafter(spec, model):
    """'auto' (the shipped drafter for this base, or None), 'none', 'random', or a drafter directory."""
    from .drafters import resolve_drafter

    return resolve_drafter(spec, model)


__version__ = "0.1.0"

__all__ = ["ChimeraError", "DEFAULT_MODEL", "GenerationResult", "SpeculativeDecoder", "load_base", "load_drafter",
           "__version__"]
