"""chimera: lossless speculative decoding for Hugging Face causal language models."""

from .errors import ChimeraError
from .generate import GenerationResult, SpeculativeDecoder
from .models import DEFAULT_MODEL, load_base

__version__ = "0.1.0"

__all__ = ["ChimeraError", "DEFAULT_MODEL", "GenerationResult", "SpeculativeDecoder", "load_base", "__version__"]
