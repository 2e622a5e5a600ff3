"""``chimera throughput``: many users at once. Requests replayed at fixed concurrency through the server's engine.

For each concurrency c (1, 4, 16, 64 by default) c clients each send the next question's first turn as soon as
their last answer is complete, until every question is answered; the engine batches what is in flight
(server/engine.py: a request alone decodes speculatively, several join one running batch). Reported per method
and concurrency: total tokens/s (all answers over the wall time), mean per-request tokens/s, and latency p50 and
p99. Methods: ``ar`` (the engine without a drafter), ``chimera`` (with one), and, as references rather than servers,
``hf`` (transformers' ``generate`` on left-padded batches of c prompts at a time) and ``hf-compiled`` (the same with
``cache_implementation="static"``, which transformers compiles and replays as CUDA graphs on a GPU: the strongest
baseline there; each batch is filled up to c rows with its last prompt, the extra answers dropped, so that one
static cache, sized and compiled in an untimed first batch, serves every batch).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ChimeraError
from ..graph_runner import power_of_two_at_least
from ..text import encode_prompt, eos_token_ids

METHODS = ("hf", "hf-compiled", "ar", "chimera")


@dataclass
class LoadResult:
    method: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    latency_p50_s: float
    latency_p99_s: float
    request_tokens_per_s: float  # mean over requests of their tokens / their latency
    batch_drafted_share: float | None = None  # of the running batch's steps, the drafted ones (a drafting batch)
    batch_tau: float | None = None  # tokens a sequence emitted per drafted batch step
    batch_depths: dict | None = None  # the running batch's steps at each chain depth (0: plain)
    batch_depth_seconds: dict | None = None  # and their seconds
    batch_catch_up_seconds: float | None = None  # of the drafted steps' seconds, the host's reading members' tokens in
    worker: dict | None = None  # where the engine's worker spent its time (server/engine.py: WorkerTime)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(method: str, concurrency: int, answers: list[tuple[int, float]], seconds: float) -> LoadResult:
    """``answers``: (tokens, latency) per request."""
    latencies = [latency for _, latency in answers]
    return LoadResult(method, concurrency, len(answers), sum(t for t, _ in answers), round(seconds, 3),
                      round(percentile(latencies, 0.5), 3), round(percentile(latencies, 0.99), 3),
                      round(statistics.mean(t / max(latency, 1e-9) for t, latency in answers), 2))


async def replay(engine, prompts: list[list[int]], concurrency: int, max_new_tokens: int
                 ) -> tuple[list[tuple[int, float]], float]:
    """Closed loop: ``concurrency`` clients, each sending the next prompt once its last answer is done."""
    pending = list(range(len(prompts)))
    answers: list[tuple[int, float]] = []

    async def client() -> None:
        while pending:
            prompt = prompts[pending.pop(0)]
            start = time.perf_counter()
            job = engine.submit(prompt, max_new_tokens, stream=False)
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise ChimeraError(f"a request failed: {value.message}")
                if kind == "done":
                    answers.append((value.new_tokens, time.perf_counter() - start))
                    break

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers, time.perf_counter() - start


def run_engine(decoder, prompts, concurrency: int, max_new_tokens: int, max_batch: int,
               batch_drafting: bool = False) -> LoadResult:
    """The rows of the engine's batch hold the longest prompt and its answer (a power of two: KV memory is
    rows x this, allocated up front; the model's whole context would be 4x more for the default model)."""
    from ..server.engine import Engine

    context = power_of_two_at_least(max(map(len, prompts)) + max_new_tokens, 256)
    engine = Engine(decoder, max_queue=max(concurrency, 1), timeout=3600.0, max_batch=max_batch,
                    batch_context=context, batch_drafting=batch_drafting)
    engine.warm_up()  # untimed: the batch's step shapes captured (on a GPU; until session 15 inside the timing)
    engine.start()
    try:
        answers, seconds = asyncio.run(replay(engine, prompts, concurrency, max_new_tokens))
    finally:
        engine.stop()
    result = summarize("chimera" if decoder.drafter is not None else "ar", concurrency, answers, seconds)
    result.worker = engine.spent.to_dict()
    counts = engine.batch.counts if engine.batch is not None and engine.batch.drafts is not None else None
    if counts is not None and counts.steps:
        result.batch_drafted_share = round(counts.drafted / counts.steps, 3)
        result.batch_tau = round(counts.tau, 3) if counts.tau is not None else None
        result.batch_depths = dict(sorted(counts.by_depth.items()))
        result.batch_depth_seconds = {depth: round(s, 4) for depth, s in sorted(counts.seconds_by_depth.items())}
        result.batch_catch_up_seconds = round(counts.catch_up_seconds, 4)
    return result


def run_hf(model, tokenizer, prompts, concurrency: int, max_new_tokens: int, static: bool = False) -> LoadResult:
    """``generate`` on batches of ``concurrency`` prompts (left-padded, greedy); each request's latency is its
    batch's time. ``static``: with a static cache (``hf-compiled``), every batch ``concurrency`` rows (filled with its
    last prompt), after an untimed batch of the longest prompts that sizes the cache and compiles."""
    from ..train.distill import answer_batch
    from ..models import synchronize

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    options = {"cache_implementation": "static"} if static else {}

    def answer(first: int, batch: list[tuple[int, list[int]]]):
        if static:
            batch = batch + [batch[-1]] * (concurrency - len(batch))
        return answer_batch(model, first, batch, max_new_tokens, 0.0, 0, pad, eos, device, **options)  # greedy

    if static:
        answer(0, [(0, p) for p in sorted(prompts, key=len)[-concurrency:]])
    answers, start = [], time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        batch = list(enumerate(prompts[first: first + concurrency]))
        synchronize(device)
        t0 = time.perf_counter()
        rows = answer(first, batch)[:len(batch)]
        synchronize(device)
        seconds = time.perf_counter() - t0
        answers += [(sum(mask), seconds) for _, _, mask in rows]
    return summarize("hf-compiled" if static else "hf", concurrency, answers, time.perf_counter() - start)


def table(results: list[LoadResult]) -> str:
    lines = ["| method | concurrency | requests | total tokens/s | per-request tokens/s | latency p50 / p99 (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.method} | {r.concurrency} | {r.requests} | {r.tokens_per_s:.1f} | "
                     f"{r.request_tokens_per_s:.1f} | {r.latency_p50_s:.2f} / {r.latency_p99_s:.2f} |")
    served = [r for r in results if r.worker is not None]
    if served:
        from ..server.engine import WORK

        lines += ["", "Where the engine's worker spent each run (seconds, and how many times):", "",
                  "| method | concurrency | wall time | " + " | ".join(WORK) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in WORK) + " |"]
        for r in served:
            cells = [f"{r.worker[kind]['seconds']:.3f} ({r.worker[kind]['count']})" for kind in WORK]
            lines.append(f"| {r.method} | {r.concurrency} | {r.seconds:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput(model, tokenizer, drafter, questions, methods, concurrencies, max_new_tokens: int, out: Path,
               max_batch: int | None = None, progress=print, batch_drafting: bool = False, tree="auto",
               draft_vocab="auto") -> list[LoadResult]:
    """Every method at every concurrency on the first turns of ``questions``; writes ``out``/throughput.json and
    throughput.md as it goes."""
    from ..generate import SpeculativeDecoder

    prompts = [encode_prompt(tokenizer, q.turns[0]) for q in questions]
    out.mkdir(parents=True, exist_ok=True)
    decoders = {"ar": SpeculativeDecoder(model, tokenizer, None)}
    if "chimera" in methods:
        if drafter is None:
            raise ChimeraError("method chimera needs a drafter: none is shipped for this model")
        decoders["chimera"] = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=draft_vocab)
    warm = prompts[:2]
    for name in methods:  # untimed: calibration, packing, captures
        if name in decoders:
            # a request decoding alone replays captured (and compiled) shapes on a GPU: every one the prompts reach
            decoders[name].warm_up(max(map(len, prompts)), max_new_tokens)
            run_engine(decoders[name], warm, 2, 8, max_batch=2, batch_drafting=batch_drafting)
    results = []
    for concurrency in concurrencies:
        for name in methods:
            if name in ("hf", "hf-compiled"):
                result = run_hf(model, tokenizer, prompts, concurrency, max_new_tokens, static=name == "hf-compiled")
            else:
                result = run_engine(decoders[name], prompts, concurrency, max_new_tokens,
                                    max_batch=max_batch or max(concurrency, 1), batch_drafting=batch_drafting)
            results.append(result)
            drafting = (f", the batch drafted {100 * result.batch_drafted_share:.0f} % of its steps (tau "
                        f"{result.batch_tau})" if result.batch_drafted_share is not None else "")
            progress(f"{name} at concurrency {concurrency}: {result.tokens_per_s:.1f} tokens/s, "
                     f"p99 {result.latency_p99_s:.2f} s{drafting}")
            (out / "throughput.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
            (out / "throughput.md").write_text(table(results) + "\n")
    return results
