"""The base model's KV cache over the verified sequence, and compaction after a tree step.

We use transformers' own ``DynamicCache`` and touch only its public per-layer ``keys``/``values`` tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    # Full-attention layers only: sliding windows are handled by refusing sequences longer than the window.
    return DynamicCache()


@torch.inference_mode()
def keep_path(cache: DynamicCache, prefix_len: int, nodes: torch.Tensor) -> None:
    """After a tree forward the cache holds prefix + all tree nodes; keep prefix + ``nodes`` (in order).

    Only the tail moves, so the cost is the accepted length, not the sequence length.
    """
    keep = prefix_len + nodes
    new_len = prefix_len + nodes.numel()
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        layer.keys[..., prefix_len:new_len, :] = layer.keys.index_select(-2, keep)
        layer.values[..., prefix_len:new_len, :] = layer.values.index_select(-2, keep)
        layer.keys = layer.keys[..., :new_len, :]
        layer.values = layer.values[..., :new_len, :]

