"""Which base model a drafter or a data directory belongs to.

The fingerprint of the embedding matrix is a probe of 64 of its values at fixed places, compared with a
tolerance: it survives casting the base between float32, bfloat16 and float16 (an exact hash would not),
yet any other model, or another fine-tune of the same one, fails it.
"""

from __future__ import annotations

import torch

PROBE_SIZE = 64


def embedding_probe(model) -> list[float]:
    weight = model.get_input_embeddings().weight.detach()
    vocab, dim = weight.shape
    rows = torch.linspace(0, vocab - 1, PROBE_SIZE).long()
    cols = (torch.arange(PROBE_SIZE) * 7919) % dim
    values = weight[rows.to(weight.device), cols.to(weight.device)].float().cpu()
    return [float(f"{v:.6g}") for v in values.tolist()]


def base_identity(model) -> dict:
    cfg = model.config.get_text_config()
    return {
        "name": getattr(model.config, "chimera_source", None) or getattr(model.config, "_name_or_path", ""),
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "embedding_probe": embedding_probe(model),
    }


def same_base(recorded: dict, actual: dict) -> bool:
    if (recorded.get("hidden_size"), recorded.get("vocab_size")) != (actual["hidden_size"], actual["vocab_size"]):
        return False
    probe = recorded.get("embedding_probe")
    if (not isinstance(probe, list) or len(probe) != PROBE_SIZE
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in probe)):
        return False
    a, b = torch.tensor(probe), torch.tensor(actual["embedding_probe"])
    return bool(((a - b).abs() <= 1e-2 * b.abs().max() + 1e-6).all())


def describe(identity: dict) -> str:
    return (f"{identity.get('name')!r} (hidden {identity.get('hidden_size')}, "
            f"vocab {identity.get('vocab_size')})")
