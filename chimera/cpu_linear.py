"""Linear layers through oneDNN with prepacked weights, for float32 inference on a CPU.

``F.linear`` sends a product of a few rows to MKL, which on 2 AMD EPYC cores streams the weights at 8-12 GB/s
(and, for a vocabulary projection, takes a slower route still for 2 to 16 rows). oneDNN, given the weight
once reordered into its blocked layout, reads it faster (12-22 GB/s) and costs about the same for 1 to 5
rows: a base forward over a 5-token tree then costs about what one token does, which is what speculative
decoding needs (scripts/cpu_forward_cost.py measures both routes).

The packed copy is a second copy of the weights, so ``packed_copy`` shares everything else with the model it
copies and ``fits_in_memory`` says whether it may be made.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import attention

ROWS_HINT = 16  # oneDNN picks its blocking for this many rows; hints of 4 to 64 measured alike for 1-16 rows
MEMORY_SHARE = 0.5  # pack only if the copy takes at most this share of the memory still available


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# resolved once: each forward makes ~200 of these calls, so the lookup and overload dispatch matter
_REORDER = torch.ops.mkldnn._reorder_linear_weight.default if ONEDNN else None
_PRODUCT = torch.ops.mkldnn._linear_pointwise.default if ONEDNN else None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked products serve this device and dtype: float32 on a CPU, with a PyTorch built with
    MKLDNN (every x86 and ARM wheel)."""
    return ONEDNN and device.type == "cpu" and dtype == torch.float32


class PackedWeight:
    """A weight (out, in) and its oneDNN packing, redone whenever the weight is changed in place."""

    def __init__(self, weight: torch.Tensor, rows: int = ROWS_HINT):
        self.weight = weight
        self.rows = rows
        self._packed = None
        self._version = None

    def packed(self) -> torch.Tensor:
        version = (self.weight._version, self.weight.data_ptr())  # in-place edits, or ``.data`` swapped
        if self._packed is None or version != self._version:
            with torch.no_grad():
                self._packed = _REORDER(self.weight.detach(), self.rows)
            self._version = version
        return self._packed

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, by oneDNN for float32 on a CPU when nothing needs gradients."""
        w = self.weight  # ``available`` for x and w, inlined: this runs for every layer of every forward
        if (ONEDNN and x.is_cpu and w.is_cpu and x.dtype == torch.float32 and w.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return _PRODUCT(x, self.packed(), bias, "none", [], "")
        return F.linear(x, w, bias)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` sharing another's weight and bias, multiplying through a ``PackedWeight`` at inference."""

    def __init__(self, linear: nn.Linear, rows: int = ROWS_HINT):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.product = PackedWeight(self.weight, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` below ``module`` by a ``PackedLinear``, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return module


def packed_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers run packed. Parameters and buffers are shared, not copied, so
    the model itself is left as it was (``generate`` on it still runs the stock kernels)."""
    return pack_linears(attention.shared_copy(model))


_SHARED_COPIES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def shared_packed_copy(model: nn.Module) -> nn.Module | None:
    """The packed copy of ``model`` that every decoder of it shares (``chimera bench`` builds three), made on
    first use if it fits in memory; None if it does not. It lives as long as the model does."""
    if model not in _SHARED_COPIES:
        if not fits_in_memory(model):
            return None
        _SHARED_COPIES[model] = packed_copy(attention.verifying_model(model))  # what a verifier runs, packed
    return _SHARED_COPIES[model]


def drop_shared_packed_copy(model: nn.Module) -> None:
    """Free the shared packed copy of ``model`` (a decoder that already holds it keeps it alive)."""
    _SHARED_COPIES.pop(model, None)


def linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def available_memory() -> int | None:
    """Bytes of memory still available (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(model: nn.Module) -> bool:
    free = available_memory()
    return free is not None and linear_bytes(model) <= MEMORY_SHARE * free
