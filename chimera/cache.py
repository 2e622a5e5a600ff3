"""The base model's KV cache over the verified sequence, and compaction after a tree step.

Two kinds, both through transformers' public ``Cache`` interface. ``GrowingCache`` grows with the sequence:
attention covers exactly the verified tokens (best without graphs, e.g. on a CPU). ``SlotCache`` has a fixed
number of slots and writes each forward's tokens at explicit slot indices, so a tree forward has the same
shapes every step and can be captured in a CUDA graph; the attention mask hides the unused slots.

Where a forward writes is set on the cache just before the call (``slots``; the running batch's ``rows`` and
``attended``), not passed with the forward: transformers 5.17's attention calls ``update(keys, values, layer_idx)``
with nothing else (5.24 passes the forward's keyword arguments along; checked in both sources, session 15), so on
the GPU machine's version an attribute read at the call is the only public way in. Each is set by the one function
that runs the forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

FIRST_CAPACITY = 512  # tokens a growing layer holds before its first reallocation


class GrowingLayer(CacheLayerMixin):
    """One layer's keys and values in buffers with room to spare: a forward writes its tokens after the
    sequence and attends over a view of exactly the sequence. ``DynamicLayer`` concatenates instead, copying
    the whole cache at every step (10 ms a token for SmolLM2 on 2 CPU cores at 300 tokens)."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.key_buffer = key_states.new_empty(*key_states.shape[:-2], FIRST_CAPACITY, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:-2], FIRST_CAPACITY,
                                                   value_states.shape[-1])
        self.is_initialized = True

    def _reserve(self, total: int) -> None:
        capacity = self.key_buffer.shape[-2]
        if total > capacity:
            size = max(2 * capacity, total)
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:-2], size, old.shape[-1])
                new[..., :self.length, :] = old[..., :self.length, :]
                setattr(self, name, new)

    def set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[..., :length, :]
        self.values = self.value_buffer[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end)
        self.key_buffer[..., self.length:end, :] = key_states
        self.value_buffer[..., self.length:end, :] = value_states
        self.set_length(end)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False  # dropped, not zeroed: the buffers are reallocated on the next update
        self.length = 0
        super().reset()


class GrowingCache(Cache):
    def __init__(self):
        super().__init__(layer_class_to_replicate=GrowingLayer)


def new_cache() -> GrowingCache:
    # Full-attention layers only: sliding windows are handled by refusing sequences longer than the window.
    return GrowingCache()


@torch.inference_mode()
def keep_path(cache: GrowingCache, prefix_len: int, nodes: torch.Tensor) -> None:
    """After a tree forward the cache holds prefix + all tree nodes; keep prefix + ``nodes`` (in order).

    Only the tail moves, so the cost is the accepted length, not the sequence length.
    """
    keep = prefix_len + nodes
    new_len = prefix_len + nodes.numel()
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        layer.key_buffer[..., prefix_len:new_len, :] = layer.keys.index_select(-2, keep)
        layer.value_buffer[..., prefix_len:new_len, :] = layer.values.index_select(-2, keep)
        layer.set_length(new_len)


def truncate(cache: GrowingCache, length: int) -> None:
    """Keep the first ``length`` tokens of ``cache`` (nothing moves)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.set_length(length)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values in ``capacity`` slots; a forward writes its tokens at ``cache.slots``."""

    is_compileable = True

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.cache.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.cache.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.cache.slots, key_states)
        self.values.index_copy_(2, self.cache.slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.capacity, 0

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    """A fixed-size KV cache. ``slots`` (a device tensor, one entry per token of the forward under way) says
    where new keys go; ``length`` counts the verified tokens, which occupy slots 0..length-1."""

    def __init__(self, num_layers: int, capacity: int, device):
        self.capacity = capacity
        self.length = 0
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @torch.inference_mode()
    def move(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the keys and values of slots ``source`` to slots ``target`` (all read before any is written)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))


class RowSlotLayer(CacheLayerMixin):
    """One layer's keys and values for a running batch: ``rows`` sequences of ``capacity`` slots each (and a spare).
    A forward covers the rows ``cache.rows`` (a slice: the running batch, or one row being prefilled; or a tensor of
    row indices, for a forward captured once for any row), writes its tokens at ``cache.slots`` (rows x tokens), and
    attends over the first ``len(cache.attended)`` slots of each row."""

    is_compileable = False

    def __init__(self, cache: "RowSlotCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, width = key_states.shape
        # one slot more than a row holds, never read or written: a forward attends over a window of the slots, a view
        # never contiguous, so that a window of every slot compiles nothing new (the drafter's row buffers measured
        # it: drafters/rows.py)
        slots = self.cache.capacity + 1
        self.keys = key_states.new_zeros(self.cache.row_count, heads, slots, width)
        self.values = value_states.new_zeros(self.cache.row_count, heads, slots, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, slots, window = self.cache.rows, self.cache.slots, self.cache.window
        count = key_states.shape[0]  # a symbol where compiled
        # written into the whole buffer by index, as transformers' StaticCache writes by index_copy_: through
        # torch.compile a scatter into a slice of the buffer became a functional copy of those rows' keys and values
        # and of the whole buffer, whose cost grew with the rows (scripts/batch_rows_cost.py, 2 layers, 64 rows of
        # 4,096 slots, inductor on this CPU: 50.5 ms with the scatter, 12.1 by index, 13.2 uncompiled; 16 rows 9.2,
        # 2.4 and 2.8 ms; rows indexed by a view of row_numbers rather than an arange a layer: 12.6-13.0 and 2.6-2.7,
        # the same within this CPU's spread). On an H100 (bfloat16, with grouped SDPA too) a compiled 64-row step went
        # from 11.9 ms with the scatter (session 16) to 2.7-3.6 (session 17), one row from 2.1 to 0.9-1.0.
        index = self.cache.row_index(count)[:, None]
        self.keys[index, :, slots] = key_states.transpose(1, 2)  # (rows, tokens) indexed, heads sliced: (r, t, h, d)
        self.values[index, :, slots] = value_states.transpose(1, 2)
        keys, values = self.keys[:, :, :window], self.values[:, :, :window]  # views (the window a symbol, compiled)
        if isinstance(rows, torch.Tensor):  # rows chosen on the device (a captured prefill): a copy of the window
            return keys.index_select(0, rows), values.index_select(0, rows)
        return keys[rows.start:rows.start + count], values[rows.start:rows.start + count]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.window, 0

    def get_seq_length(self) -> int:
        return 0  # positions and masks are always given explicitly

    def get_max_length(self) -> int:
        return self.cache.capacity


class RowSlotCache(Cache):
    """KV slots for a running batch of sequences, one row each (batch.py). The running rows are always the first
    ones: a sequence that leaves is replaced by the last (``move_row``), so a step's forward covers a prefix of
    rows, a view. ``rows``, ``slots`` and ``attended`` describe the forward under way: ``attended`` (window,) the
    slots each row attends over, 0 to window - 1 (a view of ``slot_numbers``), a tensor so that a compiled forward
    reads the window from its size, a symbol (one compilation for every window, batch.py), where an integer would be
    compiled as a constant."""

    def __init__(self, num_layers: int, row_count: int, capacity: int, device):
        self.row_count = row_count
        self.capacity = capacity
        self.rows = slice(0, 0)
        self.slots = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.slot_numbers = torch.arange(capacity, device=device)  # made once: every forward's window is a view of it
        self.attended = self.slot_numbers
        self.row_numbers = torch.arange(row_count, device=device)  # made once: every forward's rows are a view of it
        super().__init__(layers=[RowSlotLayer(self) for _ in range(num_layers)])

    @property
    def window(self) -> int:
        """The slots of each row the forward under way attends over (a symbol where it is compiled)."""
        return self.attended.shape[0]

    def row_index(self, count: int) -> torch.Tensor:
        """The indices of the ``count`` rows of the forward under way: ``rows`` itself where it is a tensor, else a
        view of ``row_numbers`` (no kernel, and the same for every layer)."""
        rows = self.rows
        return rows if isinstance(rows, torch.Tensor) else self.row_numbers[rows.start:rows.start + count]

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Every allocated layer's keys and values, (row_count, heads, capacity + 1, head size) each."""
        return [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]

    @property
    def allocated(self) -> bool:
        """Whether every layer's keys and values exist (a first forward allocates them)."""
        return all(layer.is_initialized for layer in self.layers)

    @torch.inference_mode()
    def write_row(self, row: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Each layer's (1, heads, n, head size) keys and values into the first n slots of ``row``; False (and
        nothing written) where this cache cannot take them (not allocated yet, or other shapes)."""
        if len(pairs) != len(self.layers) or not self.allocated:
            return False
        for layer, (keys, values) in zip(self.layers, pairs):
            same_heads = keys.shape[1::2] == layer.keys.shape[1::2]  # (heads, head size)
            if keys.shape[0] != 1 or not same_heads or keys.shape[2] >= self.capacity or keys.dtype != layer.keys.dtype:
                return False
        for layer, (keys, values) in zip(self.layers, pairs):
            layer.keys[row, :, :keys.shape[2]] = keys[0]
            layer.values[row, :, :values.shape[2]] = values[0]
        return True

    @torch.inference_mode()
    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` slots of row ``source`` into row ``target``."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]
