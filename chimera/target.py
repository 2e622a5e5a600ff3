"""One forward of the target, the base model whose tokens are verified (vLLM's word), over new tokens on top of its
KV cache: a plain step, a prefill, or a tree. (``drafters.interface`` is the drafters' side; "base" elsewhere names
the model a drafter was trained for.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache_argument import cache_kwargs
from .cpu_linear import PackedWeight
from .tree import tree_attention_mask


@dataclass
class TargetOutput:
    logits: torch.Tensor  # (n, vocab) float32
    hidden: torch.Tensor  # (n, hidden x (1 + feature layers)) what a drafter reads (``feature_states``)


def feature_states(hidden_states, layers: tuple[int, ...] = ()) -> torch.Tensor:
    """What a drafter reads of a forward's ``hidden_states`` (transformers': the embeddings, then the states after
    each layer, the last one normed, what the vocabulary head reads): the states after each of ``layers``, then the
    final one, joined along the last axis; the final one alone without ``layers``. Read from the forward that
    verifies, so they cost no forward of their own."""
    return torch.cat([hidden_states[i] for i in layers] + [hidden_states[-1]], -1) if layers else hidden_states[-1]


def stack_forward(stack, features: tuple[int, ...] = (), **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder stack (``model.get_decoder()``, or its compiled twin) over ``inputs``: its final states (what the
    vocabulary head reads) and what a drafter reads of the same forward (``feature_states``; asked of the stack only
    where ``features`` are wanted, so that a compiled stack keeps its one graph otherwise)."""
    out = stack(**inputs, **({"output_hidden_states": True} if features else {}))
    final = out.last_hidden_state
    return final, feature_states(out.hidden_states, features) if features else final


@torch.inference_mode()
def forward(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0, head=None,
            decoder=None, features: tuple[int, ...] = ()) -> TargetOutput:
    """``input_ids`` is (n,). With no mask the tokens are causal after the cache, as in ``generate``.
    ``logits_to_keep`` > 0 scores only the last that many tokens (hidden states come for all of them); a tensor of
    indices scores those tokens (as transformers' own ``logits_to_keep`` does).
    ``head``: on a CPU, the route of the vocabulary projection (``vocab_head``), where the model allows one.
    ``decoder``: what runs in place of ``model.get_decoder()`` (compiled.CompiledDecoder), for a model with a
    plain vocabulary head; its output is then projected here, as ``model`` itself would.
    ``features``: the layers whose hidden states come beside the final ones (``feature_states``)."""
    start = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(start, start + input_ids.numel(), device=input_ids.device)
    inputs = dict(input_ids=input_ids[None], position_ids=position_ids[None], attention_mask=attention_mask,
                  use_cache=True)
    if decoder is not None or (plain_vocab_head(model) and input_ids.device.type == "cpu"):
        stack = model.get_decoder()
        final, states = stack_forward(decoder or stack, features, **inputs, **cache_kwargs(stack, cache))
        project = head or (lambda z: vocab_logits(z, model.get_output_embeddings()))
        return TargetOutput(logits=project(kept_states(final[0], logits_to_keep)).float(), hidden=states[0])
    out = model(**inputs, **cache_kwargs(model, cache), output_hidden_states=True, logits_to_keep=logits_to_keep)
    return TargetOutput(logits=out.logits[0].float(), hidden=feature_states(out.hidden_states, features)[0])


def kept_states(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The states of ``hidden`` (..., tokens, size) that ``logits_to_keep`` asks logits for, as transformers reads
    it: the last that many tokens (0: all), or those at the indices given (a tensor)."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[..., logits_to_keep, :]
    return hidden[..., -logits_to_keep:, :] if logits_to_keep else hidden


def plain_vocab_head(model) -> bool:
    """Whether the logits are exactly ``lm_head(final hidden state)``, so that we may compute them ourselves:
    no bias, no logit scaling or soft-capping (Gemma 2, Cohere) on top."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (isinstance(head, nn.Linear) and head.bias is None and hasattr(model, "get_decoder")
            and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) is None
            and getattr(config, "logits_scaling", None) in (None, 1, 1.0))


def vocab_logits(z: torch.Tensor, lm: nn.Module) -> torch.Tensor:
    """``lm(z)``; a stock bias-free head goes through ``weight_logits`` (its faster CPU route)."""
    return weight_logits(z, lm.weight) if type(lm) is nn.Linear and lm.bias is None else lm(z)


def weight_logits(z: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """``z @ weight.T`` for a bias-free vocabulary projection (or a slice of one), with a faster route for a
    handful of rows on CPU at inference."""
    if isinstance(weight, PackedWeight):
        return weight(z)
    if z.dim() == 2 and z.device.type == "cpu" and not torch.is_grad_enabled():
        return _few_rows_times_vocab(z, weight)
    return nn.functional.linear(z, weight)


HEAD_ROUTES = ("linear", "few_rows", "packed")


def vocab_head(model, route: str):
    """The vocabulary projection of a plain-headed model (``plain_vocab_head``) by one route: ``linear``
    (``F.linear``, MKL's product), ``few_rows`` (``weight @ z.T``, faster for a few rows on some processors) or
    ``packed`` (oneDNN's prepacked product). Which is fastest depends on the processor (measured on 2 cores: on an
    AMD EPYC 6.8, 2.3 and 2.1 ms a row; on an Intel Xeon 6.0, 15.2 and 5.5 ms), so calibration.py chooses."""
    return weight_head(model.get_output_embeddings().weight, route)


def weight_head(weight: torch.Tensor, route: str | None):
    """``z @ weight.T`` (a bias-free vocabulary projection, or a drafter's rows of one) by one of HEAD_ROUTES, or
    (None) by ``weight_logits``'s own choice."""
    if route is None:
        return lambda z: weight_logits(z, weight)
    if route == "linear":
        return lambda z: nn.functional.linear(z, weight)
    if route == "few_rows":
        return lambda z: _few_rows_times_vocab(z, weight) if z.dim() == 2 else nn.functional.linear(z, weight)
    return PackedWeight(weight)


def _few_rows_times_vocab(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z (m, d) @ weight (V, d).T on CPU. ``F.linear`` takes a slow path there for small m (measured on 2
    cores, V = 49152, d = 576: 23-29 ms at m = 2..8, 12 ms at m = 1) that ``weight @ z.T`` with m >= 2 avoids
    (5-15 ms)."""
    if z.shape[0] == 1:
        return (weight @ z.repeat(2, 1).T).T[:1]  # a contiguous copy: an expanded view is slower
    return (weight @ z.T).T


def forward_tree(model, cache, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor,
                 head=None, features: tuple[int, ...] = ()) -> TargetOutput:
    """Score every node of a draft tree in one pass: node i sits at position prefix + depth(i) and attends
    to the prefix and to its own ancestors, so its logits equal those of decoding its path token by token."""
    prefix = cache.get_seq_length()
    mask = tree_attention_mask(prefix, ancestors, model.dtype)
    return forward(model, cache, tokens, position_ids=prefix + depths, attention_mask=mask, head=head,
                   features=features)
