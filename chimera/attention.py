"""Attention over a masked tree without copying the keys and values of grouped-query models, on a CPU.

Why: transformers' SDPA attention serves a grouped-query model (several query heads per key/value head) without
copying keys and values only where no mask is given, or for a single query token outside torch.compile. Every tree
we verify comes with a mask and several tokens, so transformers repeats each layer's keys and values once per query
head of their group (``repeat_kv``): SmolLM2-135M, 3 query heads a key head, copies 2 x 9 heads x its whole context
at each of its 30 layers. On an Intel Xeon (2 cores, float32, a 200-token context) that copy was 5.6 of the 40.2 ms
of a forward over 3 tree tokens (33.5 ms over one); on the same machine in a faster spell 1.7 of 28.4 ms (24.6 over
one; scripts/cpu_tree_costs.py); it grows with the context.

``grouped_attention`` computes the same attention through SDPA's own grouped-query support (``enable_gqa``), whose
masked CPU kernel gives bit-identical results (measured on the default model over 3-, 5- and 8-token trees; tested
on four families). Everything else (no mask, one head per key, dropout, another device) goes to transformers' own
SDPA function unchanged. It is installed through transformers' public ``AttentionInterface``, on the copy of the
model the verifier runs (``verifying_model``: weights shared), so ``generate`` on the user's model is untouched.

Tried on a GPU in session 14 and not kept then: masked grouped-query SDPA falls back to the math kernel on CUDA, so there the query
heads of a group were read as one longer query over their shared key head, the mask repeated to match. On an H100 in
bfloat16 (torch.compile, CUDA graphs; scripts/step_anatomy.py) a 64-token tree's forward went from 529 to 507 kernels
and 1.84/2.07/2.53 to 1.80/2.04/2.51 ms over 512/1024/2048 KV slots, but a one-token forward from 1.12/1.13/1.22 to
1.08/1.30/1.73 ms, and our plain loop from 914 to 795 tokens/s (session 14). Taken again in session 27 with a
one-token step through SDPA's grouped kernel instead and cuDNN's kernel first for the folded trees
(``verifier_attention_folded``), it paid on an H200 in session 28, and the verifier takes it where its forward is
compiled (``verifier_route``, with the figures); float32 keeps transformers' own.

The running batch on a GPU (batch.py) is another matter: its plain step is one query token per row over every row's
keys and values, and the copy grows with rows x slots (an H100, bfloat16, 64 rows: 5.2 ms a step over 256 slots,
17.0 over 2,048, against 3.1 for one row; docs/gpu/batch_step_cost_session16_h100.jsonl). One layer's attention of
64 rows over 2,048 slots on that H100 with torch 2.11 (scripts/batch_attention_kernels.py,
docs/gpu/batch_attention_kernels_h100.json): repeated keys 463 us; each group's query heads folded into queries of
their key head (what transformers 5.24 does itself for a single query, outside torch.compile) 67 us; SDPA's own
grouped support with the mask (``enable_gqa``, which transformers avoids on CUDA for fear of the math kernel, 414 us
here) 39 us (16 rows: 126, 35 and 22 us). So ``batch_attention`` takes grouped SDPA for a plain step, on the batch's
own twin of the model (``batch_model``). Session 17 measured it inside the compiled step on an H100: a 64-row step
over 2,048 slots 2.7-3.6 ms, its 30 layers' attention 1.17 ms (cuDNN; docs/gpu/batch_step_cost_session17_h100.json).
A drafted chain of a few tokens a row went on through transformers' repeated keys until the same session measured
it (uncompiled, graphed, 1,024 slots: a chain of 4 tokens over 64 rows 13.1 ms a step against 4.2 for one token,
docs/gpu/batch_drafting_step_cost_uncompiled_h100.json); it now takes grouped SDPA too. Compiled, the forward that
verifies chains of 4 tokens still cost an H200 1.5 ms for 2 rows and 3.8 ms for 64, against 1.2-1.7 ms for a plain
forward (session 19). ``batch_attention_folded`` is a candidate for it, off until measured there (``RunningBatch``'s
``chain_attention``): a chain's query heads folded into queries of their key head, as tried for the lone verifier's
trees above, where SDPA's grouped kernel with a mask may not serve several queries a row; one query a row stays
grouped, which measured fastest. Session 20 measured why on an H100 (scripts/batch_attention_kernels.py, one layer,
docs/benchmarks.md): for 4 queries a row the grouped kernel is no longer split along the slots, 37-66 us for 16 rows
and 84-155 for 64 over 1,024-2,048 slots, where folded queries with cuDNN's kernel forced took 40-42 and 61-67; SDPA's
own choice for folded queries took 67-92. The candidate now forces cuDNN first (``_cudnn_first``); its step is for
a GPU to time (``--chain-attention folded``). ``batch_attention_heads`` is another (session 21): a chain's query
tokens read as query heads, one query each, the shape whose grouped kernel is split along the slots; for a GPU to
time too (``--chain-attention heads``).
"""

from __future__ import annotations

import copy
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "chimera_grouped_sdpa"


def _plain(module, attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether grouped SDPA has nothing to offer: no grouped heads, no mask shared by the heads, or a feature it
    lacks (dropout, a position bias, soft-capping, attention weights asked for)."""
    return (getattr(module, "num_key_value_groups", 1) == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or bool(dropout) or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or bool(kwargs.get("output_attentions")))


def _grouped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                  scaling: float | None) -> tuple[torch.Tensor, None]:
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (b, heads, n, d), key and value (b, kv heads, slots, d),
    a mask broadcast over heads (b or 1, 1, n, slots); returns (b, n, heads, d). Grouped SDPA on a CPU."""
    if _plain(module, attention_mask, dropout, kwargs) or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _grouped_sdpa(query, key, value, attention_mask, scaling)


FOLDED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ORDERED = "set_priority" in inspect.signature(sdpa_kernel).parameters  # whether this torch takes the list's order


def _cudnn_first():
    """SDPA's kernels for folded queries, cuDNN's first: on an H100 (bfloat16, one layer of 64 rows of 4 queries
    folded) cuDNN's took 61-67 us over 1,024-2,048 slots, where SDPA's own choice took 78-92 and the memory-efficient
    kernel 72-135 (session 20). The others serve where cuDNN refuses a shape or is missing (a CPU). Traced by Dynamo
    without a break (checked on this CPU); a torch without ``set_priority`` keeps SDPA's order among them."""
    return sdpa_kernel(FOLDED_BACKENDS, set_priority=True) if _ORDERED else sdpa_kernel(FOLDED_BACKENDS)


def _folded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 scaling: float | None) -> tuple[torch.Tensor, None]:
    """Grouped-query attention as plain multi-head attention over the key heads: each key head's group of query heads
    read as one longer query (the group's heads one after another, each with all its queries), the mask repeated to
    match; the keys and values are read once, not repeated. cuDNN's kernel first (``_cudnn_first``)."""
    rows, heads, queries, size = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = query.reshape(rows, kv_heads, groups * queries, size)
    with _cudnn_first():
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask.repeat(1, 1, groups, 1),
                                             scale=scaling)
    return out.reshape(rows, heads, queries, size).transpose(1, 2).contiguous(), None


def _heads_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                scaling: float | None) -> tuple[torch.Tensor, None]:
    """Grouped-query attention with each query token of a row read as a query head of its own: (rows, heads x n, 1,
    size), a head's tokens one after another, so that a key head's group stays contiguous (its ``groups x n`` heads),
    each with its own row of the mask. One query a head is the shape of a plain step, whose grouped kernel is split
    along the slots (on an H100, one layer of 64 rows over 2,048 slots: 39 us for one query a row, 155 for four;
    session 20); the keys and values are read once, the mask repeated per head."""
    rows, heads, queries, size = query.shape
    as_heads = query.reshape(rows, heads * queries, 1, size)
    mask = mask.expand(rows, heads, queries, mask.shape[-1]).reshape(rows, heads * queries, 1, mask.shape[-1])
    out = F.scaled_dot_product_attention(as_heads, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.reshape(rows, heads, queries, size).transpose(1, 2).contiguous(), None


STEP_QUERIES = 8  # at most this many query tokens a row: a batch's step (a token or a drafted chain); prefills have 16+


def batch_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """The running batch's attention on a GPU: grouped SDPA for a step (one token a row, or a drafted chain),
    ``grouped_attention`` for a prefill (one row: the copy is small)."""
    if _plain(module, attention_mask, dropout, kwargs) or query.shape[2] > STEP_QUERIES:
        return grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    return _grouped_sdpa(query, key, value, attention_mask, scaling)


def verifier_attention_folded(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              **kwargs) -> tuple[torch.Tensor, None]:
    """The lone verifier's attention on a GPU where its forward is compiled (``SlotVerifier(attention_route="folded")``,
    ``verifier_route``): a one-token step through grouped SDPA (``_grouped_sdpa``), a tree or a prompt (several
    masked queries) with each key head's group of query heads folded into one longer query (``_folded_sdpa``): the
    keys and values never repeated. On an H100 (8B shape, session 27) the kernels repeating the keys and values
    (rotary fused in) took 0.57 ms of a 64-node tree's 1.07 ms of attention, and 0.25 of a one-token step's 0.54
    (what folding saved on an H200: ``verifier_route``)."""
    if _plain(module, attention_mask, dropout, kwargs):
        return grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    if query.shape[2] == 1:
        return _grouped_sdpa(query, key, value, attention_mask, scaling)
    return _folded_sdpa(query, key, value, attention_mask, scaling)


def _drafted_chain(module, query: torch.Tensor, attention_mask, dropout: float, kwargs) -> bool:
    """Whether a batch's attention call is a drafted chain's step (2 to STEP_QUERIES query tokens a row, masked), the
    one shape whose route the ``chain_attention`` candidates change; a plain step and a prefill take
    ``batch_attention``'s."""
    return 1 < query.shape[2] <= STEP_QUERIES and not _plain(module, attention_mask, dropout, kwargs)


def batch_attention_folded(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """``batch_attention`` with a drafted chain's query heads folded (``_folded_sdpa``); a plain step (one query a
    row) and a prefill as there."""
    if _drafted_chain(module, query, attention_mask, dropout, kwargs):
        return _folded_sdpa(query, key, value, attention_mask, scaling)
    return batch_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def batch_attention_heads(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """``batch_attention`` with a drafted chain's query tokens read as query heads (``_heads_sdpa``); a plain step and
    a prefill as there."""
    if _drafted_chain(module, query, attention_mask, dropout, kwargs):
        return _heads_sdpa(query, key, value, attention_mask, scaling)
    return batch_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks transformers builds itself (a prefill's) stay SDPA's
BATCH_NAME = "chimera_batch_sdpa"
AttentionInterface.register(BATCH_NAME, batch_attention)
AttentionMaskInterface.register(BATCH_NAME, sdpa_mask)
BATCH_FOLDED_NAME = "chimera_batch_sdpa_folded"
AttentionInterface.register(BATCH_FOLDED_NAME, batch_attention_folded)
AttentionMaskInterface.register(BATCH_FOLDED_NAME, sdpa_mask)
BATCH_HEADS_NAME = "chimera_batch_sdpa_heads"
AttentionInterface.register(BATCH_HEADS_NAME, batch_attention_heads)
AttentionMaskInterface.register(BATCH_HEADS_NAME, sdpa_mask)
# RunningBatch's chain_attention choices
CHAIN_ATTENTION = {"grouped": BATCH_NAME, "folded": BATCH_FOLDED_NAME, "heads": BATCH_HEADS_NAME}
VERIFIER_FOLDED_NAME = "chimera_verifier_sdpa_folded"
AttentionInterface.register(VERIFIER_FOLDED_NAME, verifier_attention_folded)
AttentionMaskInterface.register(VERIFIER_FOLDED_NAME, sdpa_mask)
# SlotVerifier's attention_route choices on a GPU: transformers' own (keys repeated under a mask; float32's), one-token
# steps grouped (the batch's twin: trees of up to STEP_QUERIES nodes grouped too, larger ones repeated), or one-token
# steps grouped and trees folded (a compiled forward's: verifier_route)
VERIFIER_ATTENTION = {"repeated": None, "grouped": BATCH_NAME, "folded": VERIFIER_FOLDED_NAME}


def verifier_route(attention_route: str, compiled: bool) -> str:
    """SpeculativeDecoder's ``attention_route`` as the verifier takes it: "auto" is "folded" where the base's forward
    is compiled (bfloat16 and float16 by default), "repeated" otherwise; any other name is itself. Measured on an H200
    in bfloat16 (session 28, docs/benchmarks.md): folded, the 8B shape's plain step 5.23 -> 4.95 ms and its 64-node
    tree's verify 6.34 -> 6.11 ms (the copies of repeated keys gone, 243 us a step), and the default model's plain
    loop 915 -> 997 tokens/s. float32 keeps transformers' own attention, whose tokens the GPU check has shown equal to
    generate's on every tree (folded: on one-token steps so far)."""
    if attention_route == "auto":
        return "folded" if compiled else "repeated"
    return attention_route


def applies(model, device_type: str = "cpu") -> bool:
    """Whether ``grouped_attention`` (``device_type`` cpu) or ``batch_attention`` (cuda) would change anything: a
    model on that device whose attention goes through transformers' attention interface, set to SDPA, with grouped
    query heads."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (model.device.type == device_type and getattr(model, "_supports_attention_backend", False)
            and model.config._attn_implementation == "sdpa" and bool(heads) and kv_heads < heads)


def install(model, name: str = NAME) -> bool:
    """Switch ``model`` (one the caller owns: a copy) to the attention registered as ``name``; whether it did."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, NotImplementedError):  # a model that refuses it keeps transformers' SDPA
        return False
    return model.config._attn_implementation == name


def shared_copy(model):
    """A copy of ``model``'s modules and configuration sharing its parameters and buffers: ours to change."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, shared)


_TWINS: dict[str, "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]"] = {
    name: weakref.WeakKeyDictionary() for name in (NAME, *CHAIN_ATTENTION.values(), VERIFIER_FOLDED_NAME)}


def _twin(model, name: str):
    """A copy of ``model`` sharing its weights and running the attention registered as ``name`` (one per model and
    name, living as long as the model); ``model`` itself where the copy refuses it."""
    twins = _TWINS[name]
    if model not in twins:
        twin = shared_copy(model)
        if not install(twin, name):
            return model  # not kept: a value holding its own key would never leave the weak dictionary
        twins[model] = twin
    return twins[model]


def verifying_model(model):
    """The model to verify with: where ``grouped_attention`` applies (a CPU), a twin of ``model`` running it, shared
    by every verifier of it; ``model`` otherwise."""
    return _twin(model, NAME) if applies(model) else model


def batch_model(model, chain_attention: str = "grouped"):
    """The model a running batch steps with: on a GPU where ``batch_attention`` applies, a twin of ``model`` running
    it (``chain_attention`` "folded": ``batch_attention_folded``, "heads": ``batch_attention_heads``);
    ``verifying_model(model)`` otherwise."""
    return _twin(model, CHAIN_ATTENTION[chain_attention]) if applies(model, "cuda") else verifying_model(model)


def verifier_model(model, attention_route: str = "repeated"):
    """The model a lone verifier (verifier.SlotVerifier) scores with: on a GPU where grouped attention applies, a twin
    running ``VERIFIER_ATTENTION[attention_route]`` ("repeated": none, transformers' own); ``verifying_model(model)``
    otherwise."""
    name = VERIFIER_ATTENTION[attention_route]
    return _twin(model, name) if name is not None and applies(model, "cuda") else verifying_model(model)
