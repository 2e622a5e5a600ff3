"""A decoding step's one read from the device, without waiting for work queued after it.

``tensor.tolist()`` waits for everything queued on the stream. When the loop has already queued the next plain
step (generate.py: a step launched ahead while the host reads, detokenizes and checks the last one), that wait
would swallow the overlap, so on a GPU the step's few integers are copied into pinned host memory behind an
event, and the read waits for that event only. Elsewhere a read is a plain ``tolist()``.
"""

from __future__ import annotations

import torch


class StepRead:
    """``start(values)`` right after the step's kernels are queued; ``result()`` when the host needs them. One
    read at a time: the next ``start`` comes after this ``result``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer: torch.Tensor | None = None  # pinned, reused from step to step
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending: torch.Tensor | None = None

    def start(self, values: torch.Tensor) -> None:
        if not self.cuda:
            self.pending = values
            return
        if self.buffer is None or self.buffer.numel() < values.numel() or self.buffer.dtype != values.dtype:
            self.buffer = torch.empty(max(values.numel(), 64), dtype=values.dtype, pin_memory=True)
        self.pending = self.buffer[:values.numel()]
        self.pending.copy_(values, non_blocking=True)
        self.event.record()

    def result(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
        values, self.pending = self.pending, None
        return values.tolist()
