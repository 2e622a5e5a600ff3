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
    from accelerate import PartialState

    # one process, or the ranks torchrun started (``chimera distill --num-processes``; gloo between CPU processes)
    processes = PartialState(cpu=next(model.parameters()).device.type == "cpu")
    store = DistillStore(out_dir, meta) if processes.is_main_process else None  # the one writer
    processes.wait_for_everyone()
    try:
        return _distill_into(store or DistillStore(out_dir), model, tokenizer, prompts, max_new_tokens, batch_size,
                             temperature, max_prompt_tokens, limit, seed, progress, processes)
    finally:
        if store is not None:
            store.close()


def _distill_into(store, model, tokenizer, prompts, max_new_tokens, batch_size, temperature, max_prompt_tokens,
                  limit, seed, progress, processes) -> dict:
    """Batches (by prompt length) go round-robin to the processes; each round the main process gathers the
    answers and appends them in batch order. A batch holds the same prompts and seed however many processes
    run, so the data is the same too (tests/test_data_parallel.py)."""
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
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="distill", unit="prompt",
               disable=not progress or not processes.is_main_process)
    batches = [(start, encoded[start: start + batch_size]) for start in range(0, len(encoded), batch_size)]
    for first in range(0, len(batches), processes.num_processes):
        mine = first + processes.process_index
        answered = [answer_batch(model, *batches[mine], max_new_tokens, temperature, seed, pad_id, eos, device)
                    if mine < len(batches) else []]
        if processes.num_processes > 1:
            from accelerate.utils import gather_object

            answered = gather_object(answered)  # every process's list, in process order = batch order
        if processes.is_main_process:
            for rows in answered:
                for pid, tokens, mask in rows:
                    store.append(pid, tokens, mask)
                bar.update(len(rows))
    bar.close()
    processes.wait_for_everyone()
    return {"samples": len(store) if processes.is_main_process else None, "new": len(encoded),
            "skipped_too_long": too_long, "dir": str(store.dir)}


def answer_batch(model, start: int, batch, max_new_tokens: int, temperature: float, seed: int, pad_id: int, eos,
                 device, **generate_options) -> list[tuple]:
    """The base's answers to one batch of (prompt id, prompt token ids): (id, tokens, assistant mask) each.
    ``generate_options`` go to ``generate`` as they are (e.g. a static cache)."""
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, ids) in enumerate(batch):  # left padding
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed + start)
    with torch.inference_mode():
        out = model.generate(input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling, **generate_options)
    rows = []
    for (pid, ids), answer in zip(batch, out[:, width:].tolist()):
        cut = next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))
        rows.append((pid, ids + answer[:cut], [0] * len(ids) + [1] * cut))
    return rows
