"""One forward of the base model over new tokens on top of its KV cache: a plain step, a prefill, or a tree."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import tree_attention_mask


@dataclass
class BaseOutput:
    logits: torch.Tensor  # (n, vocab) float32
    hidden: torch.Tensor  # (n, hidden) final-norm last-layer states (what lm_head reads)


@torch.inference_mode()
def forward(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> BaseOutput:
    """``input_ids`` is (n,). With no mask the tokens are causal after the cache, as in ``generate``."""
    start = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(start, start + input_ids.numel(), device=input_ids.device)
    out = model(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=logits_to_keep,
    )
    return BaseOutput(logits=out.logits[0].float(), hidden=out.hidden_states[-1][0])


def forward_tree(model, cache, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor) -> BaseOutput:
    """Score every node of a draft tree in one pass: node i sits at position prefix + depth(i) and attends
    to the prefix and to its own ancestors, so its logits equal those of decoding its path token by token."""
    prefix = cache.get_seq_length()
    mask = tree_attention_mask(prefix, ancestors, model.dtype)
    return forward(model, cache, tokens, position_ids=prefix + depths, attention_mask=mask)
