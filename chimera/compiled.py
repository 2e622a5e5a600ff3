"""The base model's decoder through torch.compile: the switch between a fused and an op-by-op forward.

Replaying transformers' modeling code as CUDA graphs removes the launch overhead but still runs every norm,
rotary embedding and activation as its own kernels (about 30 per layer). Inductor fuses them; we compile the
decoder stack, the same module transformers' own compiled ``generate`` compiles, and call it with our slot cache,
explicit positions and tree mask: no copied modeling code, no patching. The vocabulary projection stays outside
(one matmul, nothing to fuse), so only models whose logits are plainly ``lm_head(hidden)`` are compiled
(``target.plain_vocab_head``); others keep the uncompiled forward.

Compilation happens on the first call of each tree size, inside the warm-up of its CUDA-graph capture
(graph_runner.py): 30-45 s on an H200 for the default model's 30 layers, paid once per process. The number of KV
slots is compiled as a symbol, so every capacity of slot cache reuses it (measured: 44 s for the first, 0.6 s for
each further capacity, replays equally fast); compiled per capacity, a Spec-Bench run had paid half a minute inside
timed turns whenever a longer prompt needed a larger cache.
Inductor keeps what it built on disk (under the cache directory, ``inductor/``), so a later process compiling
the same shapes with the same library versions mostly reads it back. Should compilation fail for a model, the
decoder falls back to the uncompiled forward with one warning: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref

import torch

from .cache import SlotCache
from .target import plain_vocab_head
from .models import cache_root

log = logging.getLogger("chimera")
COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}  # the command line's --compile
RECOMPILE_LIMIT = 64  # one compilation per shape (tree size x slot capacity); torch's default stops at 8


def compilable(model) -> bool:
    """Whether ``CompiledDecoder`` serves this model: a plain vocabulary head over a ``get_decoder()`` stack."""
    return plain_vocab_head(model)


class Compiled:
    """Called like ``function``; runs its compiled twin, or ``function`` itself once compiling has failed (one
    warning naming ``what`` was compiled)."""

    def __init__(self, function, what: str, backend: str = "inductor", tuned: bool = False):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        self.eager = function
        self.what = what
        self.backend = backend
        # shapes are static except where mark_capacity says otherwise (dynamic=None, automatic dynamism off)
        options = {"coordinate_descent_tuning": True} if tuned and backend == "inductor" else None
        self.compiled = torch.compile(function, backend=backend, dynamic=None, options=options)
        self.failure: str | None = None  # why compiling failed, once it has
        self.seconds = 0.0  # spent in calls that compiled a new shape
        self.shapes: set[str] = set()  # the shapes announced (compiled) so far

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            return self.eager(*args, **kwargs)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, automatic_dynamic_shapes=False):
                return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler means: run uncompiled
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            cause = getattr(exc, "inner_exception", None) or exc  # what the backend itself raised
            self.failure = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            log.warning("torch.compile failed for %s (%s): running it uncompiled", self.what, self.failure[:300])
            return self.eager(*args, **kwargs)

    @contextlib.contextmanager
    def announce(self, shape: str):
        """Around the first call of a new shape: one progress line before it, its duration after. A shape met
        before (by another decoder sharing this function) gets no line: it is not compiled again."""
        if shape in self.shapes:
            yield
            return
        self.shapes.add(shape)
        if self.failure is None:
            log.info("compiling %s for %s (once per process and shape)...", self.what, shape)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.failure is None:
            log.info("compiled %s for %s in %.1f s", self.what, shape, seconds)

    def describe(self) -> str:
        if self.failure is not None:
            return "uncompiled (torch.compile failed: " + self.failure[:120] + ")"
        return f"torch.compile ({self.backend})"


def announced(function, shape: str, first: bool = True):
    """``function.announce(shape)`` around a first call (``first``) of a function that is compiled: a first call
    compiles; any other call, or a function run as it is, gets no line."""
    return function.announce(shape) if first and isinstance(function, Compiled) else contextlib.nullcontext()


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {backend: CompiledDecoder}


class CompiledDecoder(Compiled):
    """Called like ``model.get_decoder()``, compiled, with inductor's coordinate-descent tuning of its kernels'
    launch settings (what gpt-fast turns on): measured on an H200 on a Llama-3-8B shape in bfloat16, the plain
    step's forward went from 5.62 to 4.79 ms (51 to 58 % of the rated bandwidth) for twice the compilation time
    (97 s against 49 s); max-autotune of the matrix products on top gave nothing more (5.27 ms a step against
    5.26) and is not used."""

    def __init__(self, model, backend: str = "inductor"):
        super().__init__(model.get_decoder(), "the base forward", backend, tuned=True)
        # the KV compaction of every slot bank over this model (verifier.SlotBank.keep_static): one compilation and one
        # progress line for all of them (its path length and the cache's slot axis are symbols), where one per bank
        # had printed a "compiling" line for each further capacity and calibration candidate, each taking 0.0 s
        self.compaction = Compiled(SlotCache.move, "the KV compaction", backend)

    @classmethod
    def shared(cls, model, backend: str = "inductor") -> "CompiledDecoder":
        """One per model and backend in a process, so that every decoder of it (the bench's methods, the
        calibration's candidates, the server's) replays what the first one compiled, each shape compiled and
        announced once, rather than each decoder compiling through a wrapper of its own."""
        per_model = _SHARED.setdefault(model, {})
        if backend not in per_model:
            per_model[backend] = cls(model, backend)
        return per_model[backend]

    @staticmethod
    def mark_symbol(dim: int, *tensors: torch.Tensor) -> None:
        """Compile axis ``dim`` of ``tensors`` as a symbol, so that one compilation serves every rows bucket of a
        running batch, or every padded length of its prefills (batch.py), or every path length a compaction keeps
        (verifier.py); a size of 1 is compiled apart (Dynamo specializes sizes 0 and 1)."""
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)

    @staticmethod
    def mark_capacity(tensor: torch.Tensor, dim: int) -> None:
        """Compile ``tensor``'s axis ``dim`` (a number of KV slots) as a symbol, so that one compilation per tree
        size serves every capacity of slot cache (graph_runner still captures one graph per capacity)."""
        torch._dynamo.mark_dynamic(tensor, dim)
