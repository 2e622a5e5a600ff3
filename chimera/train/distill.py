"""Self-distillation: the base model answers the training prompts itself, batched, and we store the result."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..identity import base_identity
from ..text import encode_prompt, eos_token_ids
from .data import DistillStore, Prompt, file_sha256


def distill(model, tokenizer, prompts: list[Prompt], out_dir, *, prompts_file=None, max_new_tokens: int = 256,
            batch_size: int = 32, temperature: float = 0.0, max_prompt_tokens: int = 1024, limit: int | None = None,
            seed: int = 0, progress: bool = True) -> dict:
    """Answer every prompt not yet in ``out_dir``; safe to interrupt and run again."""
    meta = {
        "base": base_identity(model),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "prompts_sha256": file_sha256(prompts_file) if prompts_file else None,
    }
    store = DistillStore(out_dir, meta)
    try:
        return _distill_into(store, model, tokenizer, prompts, max_new_tokens, batch_size, temperature,
                             max_prompt_tokens, limit, seed, progress)
    finally:
        store.close()


def _distill_into(store, model, tokenizer, prompts, max_new_tokens, batch_size, temperature, max_prompt_tokens,
                  limit, seed, progress) -> dict:
    if limit is not None:
        prompts = prompts[:limit]
    done = store.done_ids
    todo = [p for p in prompts if p.id not in done]
    encoded, too_long = [], 0
    for p in todo:
        ids = encode_prompt(tokenizer, p.text)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        encoded.append((p.id, ids))
    encoded.sort(key=lambda item: len(item[1]))  # similar lengths batch with little padding
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    generator_seed = seed
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="distill", disable=not progress,
               unit="prompt")
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start: start + batch_size]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(generator_seed + start)
        with torch.inference_mode():
            out = model.generate(input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
        answers = out[:, width:].tolist()
        for (pid, ids), answer in zip(batch, answers):
            cut = next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))
            answer = answer[:cut]
            store.append(pid, ids + answer, [0] * len(ids) + [1] * len(answer))
        bar.update(len(batch))
    bar.close()
    return {"samples": len(store), "new": len(encoded), "skipped_too_long": too_long, "dir": str(store.dir)}
