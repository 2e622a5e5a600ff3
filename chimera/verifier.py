"""The base model's side of a decoding step: prefill the prompt, score a draft tree, keep the accepted path.

``GrowingVerifier`` runs eager forwards on a ``GrowingCache`` that holds exactly the verified tokens: the
cheapest attention, and what a CPU wants (there through a copy of the model with prepacked linear layers).
``SlotVerifier`` keeps the sequence in a ``SlotCache`` of fixed capacity, so scoring a tree has the same
shapes at every step; on a GPU that forward, and the compaction after it, are captured once as CUDA graphs
and replayed (graph_runner.py). That matters for small models: an eager forward of SmolLM2-135M on an H200 costs
about 19 ms whatever the tree size, nearly all of it kernel launches; replayed, 3.0 ms in bfloat16; replayed with
the decoder compiled by torch.compile (compiled.py), 1.5 ms.

A verifier serves one generation at a time (the decoder's contract): starting another one ends the last.
"""

from __future__ import annotations

import logging

import torch

from . import attention, cache as kv, cpu_linear, target
from .target import TargetOutput
from .compiled import CompiledDecoder, announced, compilable
from .graph_runner import GraphRunner, power_of_two_at_least
from .errors import ChimeraError
from .tree import TreeBuffers, additive_mask

SMALLEST_CAPACITY = 256
SMALLEST_PREFILL = 16  # tokens: a padded prompt's shortest length bucket (SlotBank.padded_prefill)
log = logging.getLogger("chimera")


class GrowingSession:
    """One generation on a cache that grows by each step's tree and shrinks back to the accepted path."""

    def __init__(self, model, head=None, features: tuple[int, ...] = ()):
        self.model = model
        self.head = head
        self.features = features  # the layers whose hidden states the drafter reads beside the final ones
        self.cache = kv.new_cache()

    def prefill(self, prompt: torch.Tensor) -> TargetOutput:
        """Hidden states of every prompt token, logits of the last one only (all the loop needs)."""
        return target.forward(self.model, self.cache, prompt, logits_to_keep=1, head=self.head,
                              features=self.features)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def score(self, tokens: torch.Tensor, tree: TreeBuffers) -> TargetOutput:
        if tree.topology.size == 1:
            return target.forward(self.model, self.cache, tokens, head=self.head, features=self.features)
        return target.forward_tree(self.model, self.cache, tokens, tree.depths, tree.ancestors, head=self.head,
                                   features=self.features)

    def keep(self, path: torch.Tensor, length: int, tree: TreeBuffers) -> None:
        """Keep the first ``length`` nodes of ``path`` (padded as acceptance.Accepted.path is). A chain's accepted
        nodes already sit right after the prefix: the cache is only cut (its 60 copies a step for the default
        model's 30 layers cost 0.4 ms on 2 CPU cores)."""
        if tree.topology.size > 1:
            start = self.length - tree.topology.size
            if tree.topology.is_chain:
                kv.truncate(self.cache, start + length)
            else:
                kv.keep_path(self.cache, start, path[:length])

    @torch.inference_mode()
    def adopt(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start from given keys and values, (1, heads, length, head size) per layer, instead of a prefill: a
        sequence leaving the server's batch to decode alone (SpeculativeDecoder.resume)."""
        for index, (keys, values) in enumerate(pairs):
            self.cache.update(keys, values, index)

    def verified_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values of the verified tokens, (1, heads, length, head size): what a running
        batch copies when this generation moves into it (batch.RunningBatch.adopt)."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]


class GrowingVerifier:
    decoder = None  # never compiled (SlotVerifier's may be)

    def __init__(self, model, head_route: str | None = None, features: tuple[int, ...] = ()):
        self.model = attention.verifying_model(model)
        self.head_route = head_route
        self.features = features
        self.head = target.vocab_head(model, head_route) if head_route and target.plain_vocab_head(model) else None

    def describe(self) -> str:
        packed = any(isinstance(m, cpu_linear.PackedLinear) for m in self.model.modules())
        return ("eager forwards" + (" with oneDNN-prepacked linear layers" if packed else " with stock linear layers")
                + (f", vocabulary projection by {self.head_route}" if self.head is not None else "")
                + ", KV cache grown in place")

    def start(self, capacity: int) -> GrowingSession:
        return GrowingSession(self.model, self.head, self.features)


class SlotBank:
    """A slot cache of one capacity, kept across generations, and the fixed-shape forwards over it.

    ``prefix`` mirrors the cache's verified length on the device, so the captured forwards read it there.
    ``padded_prefill``: read a prompt padded to a power-of-two length (at least SMALLEST_PREFILL), so that the
    prefill too is replayed from a capture per length bucket: an eager prefill of SmolLM2-135M on an H200 costs
    23 ms, and up to 110 ms when the host stalls among its ~600 launches (measured in the bench, where it was a
    tenth to a half of a short answer's time). The pads go to slots past the prompt, which the mask hides and the
    first steps overwrite. A padded forward's matrix products have other shapes than an unpadded one's, which can
    round differently, so the float32 path (exact against ``generate``) reads prompts unpadded.
    """

    def __init__(self, model, capacity: int, device: torch.device, runner: GraphRunner | None = None,
                 decoder: CompiledDecoder | None = None, padded_prefill: bool = False, features: tuple[int, ...] = ()):
        self.model = model
        self.features = features  # the layers whose hidden states the drafter reads beside the final ones
        self.capacity = capacity
        self.cache = kv.SlotCache(model.config.num_hidden_layers, capacity, device)
        self.prefix = torch.zeros((), dtype=torch.long, device=device)
        self.columns = torch.arange(capacity, device=device)
        self.runner = runner or GraphRunner(graphs=False)
        self.decoder = decoder
        # compacting op by op is 4 small kernels a layer (0.46 ms of an H200 for the default model's 30 layers);
        # compiled, a few fused ones (0.007 ms; scripts/step_kernels.py). Copies: compiled or not, the same values move
        self.move = decoder.compaction if decoder is not None else kv.SlotCache.move  # called with the cache first
        self.padded_prefill = padded_prefill
        self.generation = 0

    def prefill(self, prompt: torch.Tensor) -> TargetOutput:
        n = prompt.numel()
        self.set_length(n)  # the prefill reads the prompt's length on the device, like every captured forward
        if self.padded_prefill:
            bucket = min(power_of_two_at_least(n, SMALLEST_PREFILL), self.capacity)
            padded = prompt.new_zeros(bucket)
            padded[:n] = prompt
            out = self.runner.run(("prefill", self.capacity, bucket), self.prefill_static, padded)
            out = TargetOutput(logits=out.logits, hidden=out.hidden[:n])
        else:
            out = self.prefill_static(prompt)
        if self.decoder is not None:  # one compilation for every capacity: the slot axis is a symbol (marked once:
            for layer in self.cache.layers:  # the mark stays on the tensor, which the bank keeps)
                self.decoder.mark_capacity(layer.keys, 2)
                self.decoder.mark_capacity(layer.values, 2)
        return out

    def prefill_static(self, tokens: torch.Tensor) -> TargetOutput:
        """The prompt (the first ``prefix`` of ``tokens``; any further ones are pads) into slots 0, 1, ...: causal,
        pads at the last prompt position, logits of the last prompt token only. Reads the length on the device."""
        slots = self.columns[:tokens.numel()]
        self.cache.slots = slots
        last = (self.prefix - 1).reshape(1)
        allowed = self.columns[None, :] <= slots[:, None]
        return target.forward(self.model, self.cache, tokens, position_ids=torch.minimum(slots, last),
                              attention_mask=additive_mask(allowed, self.model.dtype), logits_to_keep=last,
                              features=self.features)

    def set_length(self, length: int) -> None:
        self.cache.length = length
        self.prefix.fill_(length)

    def score_static(self, tokens: torch.Tensor, tree: TreeBuffers) -> TargetOutput:
        """Tree node i goes to slot prefix + i at position prefix + depth(i) and sees slots below the prefix and
        its ancestors' slots. Reads the prefix on the device only: safe to capture."""
        n = tree.topology.size
        offset = self.columns - self.prefix  # each slot's index within the tree
        in_tree = (offset >= 0) & (offset < n)
        allowed = (offset < 0)[None, :] | (in_tree[None, :] & tree.ancestors[:, offset.clamp(0, n - 1)])
        self.cache.slots = self.prefix + self.columns[:n]
        mask = additive_mask(allowed, self.model.dtype)
        if self.decoder is not None:  # the mask's slot axis, like the cache's (prefill), is a symbol
            self.decoder.mark_capacity(mask, 3)
        return target.forward(self.model, self.cache, tokens, position_ids=self.prefix + tree.depths,
                              attention_mask=mask, decoder=self.decoder, features=self.features)

    def keep_static(self, path: torch.Tensor) -> None:
        """Move the slots of path nodes prefix + path[k] to prefix + k; entries past the real path move junk
        into slots beyond the new length, which the mask hides and the next tree overwrites."""
        source, target = self.prefix + path, self.prefix + self.columns[:path.numel()]
        if self.decoder is not None:
            # the path's length (a tree's depth + 1) compiled as a symbol: one compilation for trees of every depth,
            # where one per length had cost a first calibration 14-16 s each on an H100 (scripts/compaction_compiles.py)
            self.decoder.mark_symbol(0, source, target)
        with torch.inference_mode():  # the cache's tensors are inference tensors, updated in place by the compiled move
            self.move(self.cache, source, target)

    def score(self, tokens: torch.Tensor, tree: TreeBuffers) -> TargetOutput:
        key = ("score", self.capacity, tree.topology)
        shape = f"{tree.topology.size}-token trees over {self.capacity} KV slots"
        with announced(self.decoder, shape, first=not self.runner.can_run(key)):
            return self.runner.run(key, lambda t: self.score_static(t, tree), tokens)

    def keep(self, path: torch.Tensor, tree: TreeBuffers) -> None:
        """``path``: the accepted nodes padded to the tree's depth + 1 (acceptance.Accepted.path)."""
        self._run_in_place(("keep", self.capacity, tree.topology), self.keep_static, path)

    def keep_counted(self, path: torch.Tensor, count: torch.Tensor, tree: TreeBuffers) -> None:
        """``keep``, then the length grows by ``count`` (a device scalar) on the device: no host read."""
        if tree.topology.size == 1:
            self.prefix.add_(count)  # a plain step's one token is in place already
            return
        self._run_in_place(("keep counted", self.capacity, tree.topology), self.keep_counted_static, path, count)

    def keep_counted_static(self, path: torch.Tensor, count: torch.Tensor) -> None:
        self.keep_static(path)
        self.prefix.add_(count)

    def _run_in_place(self, key, fn, path: torch.Tensor, *counts: torch.Tensor) -> None:
        """Run a compaction by its runner. Its capture first runs it a few times (graph_runner.capture_graph), and
        a compaction run twice is not one run (a slot moved twice carries another's keys; a length grown twice is
        wrong): it is captured over a path that moves every slot onto itself and counts of zero."""
        if self.runner.graphs and not self.runner.can_run(key):
            with announced(self.move, "accepted paths of every length over every capacity"):
                self.runner.capture(key, fn, torch.arange(path.numel(), device=path.device),
                                    *(torch.zeros_like(c) for c in counts))
        self.runner.run(key, fn, path, *counts)


class SlotSession:
    """One generation on a slot bank. Its length is kept twice: on the device (``bank.prefix``, what the captured
    forwards read) and on the host (``length``, for the loop's room checks). ``keep`` moves both; ``keep_ahead``
    moves the device's only, so that the next step can be queued before the host has read this one (generate.py),
    and ``confirm`` brings the host's along once it has."""

    keeps_in_place = True  # a forward writes at explicit slots past the length: one never kept leaves no trace

    def __init__(self, bank: SlotBank):
        bank.generation += 1
        self.bank = bank
        self.generation = bank.generation

    def prefill(self, prompt: torch.Tensor) -> TargetOutput:
        return self._check().prefill(prompt)

    @property
    def length(self) -> int:
        return self.bank.cache.length

    def _check(self) -> SlotBank:
        if self.bank.generation != self.generation:
            raise ChimeraError("another generation started on this decoder: a decoder runs one at a time")
        return self.bank

    def score(self, tokens: torch.Tensor, tree: TreeBuffers) -> TargetOutput:
        return self._check().score(tokens, tree)

    def keep(self, path: torch.Tensor, length: int, tree: TreeBuffers) -> None:
        """Keep the first ``length`` nodes of ``path`` (padded as acceptance.Accepted.path is)."""
        bank = self._check()
        if tree.topology.size > 1:
            bank.keep(path, tree)
        bank.set_length(self.length + length)

    def keep_ahead(self, path: torch.Tensor, length: torch.Tensor, tree: TreeBuffers) -> None:
        """``keep`` with the length a device scalar nobody has read: the host's ``length`` lags until ``confirm``."""
        self._check().keep_counted(path, length, tree)

    def confirm(self, length: int) -> None:
        """The host has read the length of a step kept ahead: its own copy catches up with the device's."""
        self._check().cache.length += length


class SlotVerifier:
    """Slot caches in power-of-two capacities, so a short generation does not attend over a long one's slots.

    ``graphs``: capture each shape's forward and compaction once and replay them (graph_runner.py).
    ``compiled``: run the decoder stack through torch.compile (compiled.py) where the model allows it.
    ``padded_prefill``: replay prefills from captures per padded length (SlotBank); by default where the forward is
    compiled (bfloat16 and float16), whose results are compared with our own plain loop's, not ``generate``'s."""

    def __init__(self, model, graphs: bool, compiled: bool = False, backend: str = "inductor",
                 padded_prefill: bool | None = None, features: tuple[int, ...] = (), attention_route: str = "repeated"):
        # ``attention_route`` (attention.VERIFIER_ATTENTION), on a GPU: "repeated", transformers' SDPA, which copies
        # the keys and values once per query head under a mask; "grouped", one-token steps through SDPA's grouped-query
        # kernel (an H100, 8B shape: a plain step 6.10 ms against 6.34 in one process, session 27, each compiled apart
        # and a compilation's kernels varying by more than that); "folded", those steps grouped and trees' query heads
        # folded onto their key head, the decoder's choice where the forward is compiled (attention.verifier_route,
        # with what an H200 measured)
        self.model = attention.verifier_model(model, attention_route)
        self.features = features
        self.device = next(model.parameters()).device
        self.runner = GraphRunner(graphs)
        self.decoder = CompiledDecoder.shared(self.model, backend) if compiled and compilable(self.model) else None
        self.padded_prefill = graphs and compiled if padded_prefill is None else padded_prefill
        self.banks: dict[int, SlotBank] = {}

    def describe(self) -> str:
        forward = "eager forwards" if self.decoder is None else self.decoder.describe()
        return (("CUDA graphs of " if self.runner.graphs else "") + forward
                + " over a fixed-size slot KV cache")

    def start(self, capacity: int) -> SlotSession:
        """A session whose cache holds at least ``capacity`` tokens (prompt, new tokens and one tree)."""
        size = power_of_two_at_least(capacity, SMALLEST_CAPACITY)
        if size not in self.banks:
            self.banks[size] = SlotBank(self.model, size, self.device, self.runner, self.decoder,
                                        self.padded_prefill, self.features)
        return SlotSession(self.banks[size])


def new_verifier(model, device: torch.device, cuda_graphs: bool, packed_linears: bool = True,
                 head_route: str | None = None, compiled: bool = False, features: tuple[int, ...] = (),
                 attention_route: str = "repeated"):
    """Captured slot forwards on a GPU (when asked for; ``compiled``: of the torch.compiled decoder where the model
    allows it); eager growing forwards elsewhere, on a CPU through a
    copy of the model whose linear layers are prepacked (cpu_linear) when that copy fits in memory, with the
    vocabulary projection by ``head_route`` (target.vocab_head; None: target.vocab_logits's default). Every forward
    returns the hidden states a drafter reads: after ``features`` (layers) beside the final ones
    (target.feature_states). ``attention_route``: the slot forwards' attention on a GPU (SlotVerifier)."""
    if cuda_graphs and device.type == "cuda":
        return SlotVerifier(model, graphs=True, compiled=compiled, features=features, attention_route=attention_route)
    if packed_linears and cpu_linear.available(device, model.dtype):
        packed = cpu_linear.shared_packed_copy(model)
        if packed is not None:
            return GrowingVerifier(packed, head_route, features)
        log.warning("not enough free memory for prepacked linear layers: decoding with the stock CPU kernels")
    return GrowingVerifier(model, head_route, features)
