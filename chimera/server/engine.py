"""One worker thread owns the model; requests wait in a bounded queue and stream back to the event loop.

A single thread runs every generation, so the asyncio event loop never blocks on torch. A request that finds
the server idle (nothing running, nothing queued) is decoded speculatively, alone: the fastest way to serve one
user. Otherwise requests join a running batch (batch.py, ``max_batch`` > 1) at the next step after their
prefill and leave when they stop: continuous batching, where one forward serves every running sequence.
Speculation follows the load both ways: when requests arrive while one is decoded alone, that one moves into the
batch (``RunningBatch.adopt``) and they join it, so nobody waits for a lone request to finish; when the batch is
down to one member and nothing waits, that member goes on alone with the drafter (``SpeculativeDecoder.resume``).
Into the batch, the request's KV is copied from its lone decoding's cache; back out, its KV and the final hidden
states the batch keeps (the drafter reads them) are copied, or its tokens re-read by a prefill where the batch
did not keep them; it goes back out only where the measured speeds say it pays. Either way its text goes on as
it would have (float32: token for token, tested).

Each job carries a cancel event and a deadline that the worker checks after every step, so a client that
disconnects or a request that runs out of time stops costing compute within one decode step. Results cross
back into the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..adaptive import MovingAverage
from ..batch import RunningBatch, Sequence
from ..errors import ChimeraError
from ..generate import GenerationResult, Progress, SpeculativeDecoder
from ..sampling import SamplingConfig
from .schemas import APIError

log = logging.getLogger("chimera.server")

@dataclass
class Job:
    """One generation request in flight: its inputs, its cancel flag and the channel back to the loop."""

    input_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: dict
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # False: only the final result crosses to the loop, not every text delta
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0  # set by the worker when decoding begins
    counted: int = 0  # its tokens already counted in the engine's tokens/s

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.started - self.submitted)

    def cancel(self) -> None:
        self.cancelled.set()

    def _send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def delta(self, text: str) -> None:
        self._send("delta", text)

    def done(self, result: GenerationResult) -> None:
        self._send("done", result)

    def fail(self, error: APIError) -> None:
        self._send("error", error)


def timeout_error(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's {seconds:g} s timeout",
                    type="timeout_error", code="timeout")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


THROUGHPUT_WINDOW = 10.0  # seconds over which ``Engine.tokens_per_s`` counts


@dataclass
class Speeds:
    """Seconds per token of what the worker does, measured as it serves (moving averages): decoding alone
    (speculatively), a batch step with one member, a prefill per token read, and a move out of the batch per
    token of the request (its KV and hidden states copied, the drafter started over them). They decide whether
    the last member of a batch should go on alone: only if decoding the rest alone saves more than the move
    costs (re-reading a Spec-Bench RAG prompt of 1,000 tokens takes about a second on this project's CPU; always
    moving with a re-read made 4 clients 14 % slower than plain decoding)."""

    alone: MovingAverage = field(default_factory=MovingAverage)
    batch_of_one: MovingAverage = field(default_factory=MovingAverage)
    prefill: MovingAverage = field(default_factory=MovingAverage)
    move: MovingAverage = field(default_factory=MovingAverage)

    def worth_going_alone(self, known: int, remaining: int, copied: bool = False) -> bool:
        """Whether ``remaining`` tokens decoded alone save more than moving ``known`` tokens costs (``copied``:
        their KV and hidden states come along; else they are re-read by a prefill). Until measured, a lone
        decoding is taken to cost half a batch step a token (speculation's usual 2x), and a copied move a prefill
        (the cautious side)."""
        if self.batch_of_one.value is None or self.prefill.value is None:
            return False
        alone = self.alone.value if self.alone.value is not None else self.batch_of_one.value / 2
        per_token = self.move.value if copied and self.move.value is not None else self.prefill.value
        return remaining * (self.batch_of_one.value - alone) > known * per_token


WORK = ("join", "step", "alone", "into_batch", "out_of_batch")  # what ``WorkerTime`` tells apart


@dataclass
class WorkerTime:
    """Where the worker's time went, by kind of work: ``join`` (a request's prefill into the running batch),
    ``step`` (the batch's steps), ``alone`` (decoding a request alone, its prefill included), ``into_batch`` (a lone
    request moved into the batch) and ``out_of_batch`` (the batch's last member taken out to go on alone). Seconds
    and how often, from the host's clock around each: a join, a step and a lone decoding end with a read of the
    device's results, so the device's time is in them; a move's copies may run on into what follows it. ``chimera
    throughput`` reports it: on an H200 a drafting batch served 16 clients 19 % slower than `ar` while drafting 4 %
    of its steps (session 19), and the totals alone could not say why."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORK, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORK, 0))

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.counts[kind] += 1

    @contextmanager
    def timing(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, time.perf_counter() - start)

    def to_dict(self) -> dict:
        return {kind: {"seconds": round(self.seconds[kind], 4), "count": self.counts[kind]} for kind in WORK}


class Engine:
    """A bounded queue in front of one ``SpeculativeDecoder`` (a request alone) and, with ``max_batch`` > 1, one
    ``RunningBatch`` of up to that many sequences of at most ``batch_context`` tokens; one thread runs both."""

    def __init__(self, decoder: SpeculativeDecoder, max_queue: int = 16, timeout: float = 120.0,
                 max_batch: int = 1, batch_context: int = 2048, batch_drafting: bool = False):
        if max_queue < 1:
            raise ChimeraError(f"the queue size must be at least 1, got {max_queue}")
        if not timeout > 0:
            raise ChimeraError(f"the request timeout must be positive, got {timeout}")
        if max_batch < 1:
            raise ChimeraError(f"the batch size must be at least 1, got {max_batch}")
        self.decoder = decoder
        # the verifier's model: on a CPU the copy with prepacked linear layers where the decoder made one (a
        # batch of 16 steps twice as fast through it: 51 against 104 ms for the default model on one thread)
        # ``batch_drafting``: and the decoder's drafter, with which the batch drafts chains as deep as pays at its
        # size (batch.py, chain_depth.py); off by default: on this project's 2-core CPU it gained 3-7 % at 4 clients,
        # nothing at 16, and on an H100 it lost (0.97x / 0.88x / 0.94x `ar` at 4 / 16 / 64 clients, session 18,
        # docs/benchmarks.md), on an H200 with its chains compiled too (0.81x / 0.95x at 16 / 64, session 19); and
        # its steps compiled where the decoder's forward is (bfloat16 and float16 on a GPU).
        # The batch keeps the hidden states the decoder's drafter reads, drafting or not: a member left alone
        # continues speculatively from them
        self.batch = (RunningBatch(decoder.verifier.model, decoder.tokenizer, max_batch, batch_context,
                                   drafter=decoder.drafter if batch_drafting else None, adaptive=decoder.adaptive,
                                   compiled=decoder.verifier.decoder is not None, features=decoder.verifier.features)
                      if max_batch > 1 else None)
        self._running: list[tuple[Sequence, Job]] = []  # the batch's members, with their jobs
        self.speeds = Speeds()
        self.spent = WorkerTime()
        self._emitted: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of each step
        self.max_queue = max_queue
        self.timeout = timeout
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count(1)
        self._current: Job | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._running)

    @property
    def running(self) -> int:
        """Generations in progress: the running batch's, or the one decoded alone."""
        return len(self._running) or int(self._current is not None)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def tokens_per_s(self) -> float:
        """Tokens emitted per second over the last THROUGHPUT_WINDOW seconds (batched and alone)."""
        now = time.monotonic()
        emitted = list(self._emitted)  # a copy: the worker appends while a scrape reads
        recent = [count for t, count in emitted if now - t <= THROUGHPUT_WINDOW]
        return sum(recent) / THROUGHPUT_WINDOW

    def _count(self, tokens: int) -> None:
        now = time.monotonic()
        self._emitted.append((now, tokens))
        while self._emitted and now - self._emitted[0][0] > THROUGHPUT_WINDOW:
            self._emitted.popleft()

    def warm_up(self) -> float:
        """Capture the running batch's step shapes before the first request (RunningBatch.warm_up); seconds taken."""
        return self.batch.warm_up() if self.batch is not None else 0.0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chimera-engine", daemon=True)
            self._thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """Refuse new work, fail what is queued, cancel what runs, and join the worker."""
        self._stopping.set()
        if self._current is not None:
            self._current.cancel()
        for _, job in list(self._running):
            job.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(shutting_down())
        try:
            self._queue.put(None, timeout=1.0)  # wakes an idle worker; a busy one sees the stop flag next
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(wait)
            self._thread = None

    def submit(self, input_ids: list[int], max_new_tokens: int, stop: tuple[str, ...] = (),
               sampling: dict | None = None, stream: bool = True) -> Job:
        """Queue a job, or refuse at once: 429 when the queue is full, 503 when the engine is stopping."""
        if self._stopping.is_set():
            raise shutting_down()
        job = Job(input_ids, max_new_tokens, stop, dict(sampling or {}), time.monotonic() + self.timeout,
                  asyncio.get_running_loop(), stream, id=next(self._ids))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        return job

    def _run(self) -> None:
        alone: list[Job] = []  # too long for a batch row: decoded alone once the batch is empty
        while True:
            if not self._admit(alone):
                return
            if self._running:
                self._step()
                if not alone:
                    self._last_member_alone()
            elif alone:
                self._serve_alone(alone.pop(0))

    def _admit(self, alone: list[Job]) -> bool:
        """Take queued jobs while the batch has room (waiting for one when nothing runs); False: stop."""
        while self.batch is None or not self.batch.full:
            idle = not self._running and not alone
            try:
                job = self._queue.get() if idle else self._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None or self._stopping.is_set():
                if job is not None:
                    job.fail(shutting_down())
                for _, member in self._running:
                    member.fail(shutting_down())
                self._running.clear()
                return False
            if job.cancelled.is_set():
                continue
            if time.monotonic() > job.deadline:
                job.fail(timeout_error(self.timeout))
                continue
            if self.batch is None or (idle and self._queue.empty()):
                self._serve_alone(job)  # alone on the server: speculative decoding serves it fastest
            elif not self.batch.fits(len(job.input_ids), job.max_new_tokens):
                alone.append(job)
            else:
                self._join(job)
        return True

    def _join(self, job: Job) -> None:
        job.started = time.monotonic()
        try:
            with self.spent.timing("join"):
                sequence, text = self.batch.add(job.input_ids, job.max_new_tokens, job.stop,
                                                SamplingConfig(**job.sampling))
        except ChimeraError as exc:
            job.fail(APIError(400, str(exc)))
            return
        except Exception as exc:  # a bug or a torch failure: answer 500 and keep the worker alive
            log.exception("generation %d failed", job.id)
            job.fail(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
            return
        self._running.append((sequence, job))
        self._count(1)
        self._deliver(job, text)
        self._retire()

    def _step(self) -> None:
        """One token for every member of the batch, then retire those that stopped, left or ran out of time."""
        start = time.perf_counter()
        try:
            with self.spent.timing("step"):
                emitted = self.batch.step()
        except Exception as exc:  # a bug or a torch failure: fail the batch, keep the worker alive
            log.exception("a batched step failed")
            for sequence, job in self._running:
                job.fail(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
                self.batch.remove(sequence)
            self._running.clear()
            return
        self._count(len(emitted))
        if len(emitted) == 1:
            self.speeds.batch_of_one.add(time.perf_counter() - start)
        jobs = {id(sequence): job for sequence, job in self._running}
        for sequence, text in emitted:
            self._deliver(jobs[id(sequence)], text)
        self._retire()

    @staticmethod
    def _deliver(job: Job, text: str) -> None:
        """One new token of a batch member: counted, and its text sent where the client streams."""
        job.counted += 1
        if job.stream and text:
            job.delta(text)

    def _retire(self) -> None:
        now = time.monotonic()
        for sequence, job in list(self._running):
            if sequence.done:
                job.done(sequence.result())
            elif job.cancelled.is_set() or self._stopping.is_set():
                pass  # the client is gone, or the server stops (stop() fails what is queued; nobody listens)
            elif now > job.deadline:
                job.fail(timeout_error(self.timeout))
            else:
                continue
            self.batch.remove(sequence)
            self._running.remove((sequence, job))

    def _measure_alone(self, stream, resume: Progress | None) -> None:
        """This lone run's prefill and decoding speeds, per token."""
        result = stream.progress.result
        before = len(resume.stopper.tokens) if resume is not None else 0
        read = result.prompt_tokens + max(before - 1, 0)
        decoded = result.new_tokens - max(before, 1)  # the first token of a fresh run comes with the prefill
        copied = resume is not None and resume.verified_hidden is not None
        (self.speeds.move if copied else self.speeds.prefill).add(result.time_prefill / read)
        if decoded > 0:
            spent = result.time_draft + result.time_verify + result.time_other
            self.speeds.alone.add(spent / decoded)

    def _others_wait(self, stream) -> bool:
        """Whether a request decoded alone should move into the running batch: others wait for the worker,
        and it fits a batch row."""
        if self.batch is None or self._queue.empty():
            return False
        progress = stream.progress
        return not progress.stopper.done and self.batch.fits(len(progress.prompt_ids), progress.stopper.max_new_tokens)

    def _hand_over(self, job: Job, stream) -> None:
        """The request decoded alone continues in the batch, where what waits will join it (never waiting for it
        to finish first)."""
        with self.spent.timing("into_batch"):
            sequence = self.batch.adopt(stream.progress)
        self._count(len(sequence.stopper.tokens) - job.counted)
        job.counted = len(sequence.stopper.tokens)
        self._running.append((sequence, job))

    def _last_member_alone(self) -> None:
        """When the batch is down to one member and nothing waits, that one continues alone, speculatively (the
        fastest way to serve one user), where there is a drafter to speculate with."""
        if len(self._running) != 1 or not self._queue.empty() or self.decoder.drafter is None:
            return
        sequence, job = self._running[0]
        if sequence.done or len(sequence.prompt_ids) + sequence.stopper.max_new_tokens > self.decoder.limit:
            return
        known = len(sequence.prompt_ids) + len(sequence.stopper.tokens) - 1
        remaining = sequence.stopper.max_new_tokens - len(sequence.stopper.tokens)
        if not self.speeds.worth_going_alone(known, remaining, copied=sequence.hidden_kept):
            return
        with self.spent.timing("out_of_batch"):
            progress = self.batch.progress_of(sequence)
            self.batch.remove(sequence)
        self._running.clear()
        self._serve_alone(job, resume=progress)

    def _serve_alone(self, job: Job, resume: Progress | None = None) -> None:
        self._current = job
        start, moved = time.perf_counter(), self.spent.seconds["into_batch"]
        try:
            self._serve(job, resume)
        finally:
            self._current = None  # a hand-over into the batch at the end is counted as that, not here
            self.spent.add("alone", time.perf_counter() - start - (self.spent.seconds["into_batch"] - moved))

    def _serve(self, job: Job, resume: Progress | None = None) -> None:
        """Decode ``job`` alone, from its start or (``resume``) from where the batch left it."""
        if resume is None:
            job.started = time.monotonic()
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.fail(timeout_error(self.timeout))
            return
        chunks = None
        try:
            stream = (self.decoder.resume(resume) if resume is not None else
                      self.decoder.stream(input_ids=job.input_ids, max_new_tokens=job.max_new_tokens, stop=job.stop,
                                          **job.sampling))
            chunks = iter(stream)
            for text in chunks:
                if job.stream:
                    job.delta(text)
                if job.cancelled.is_set():
                    return
                if time.monotonic() > job.deadline:
                    job.fail(timeout_error(self.timeout))
                    return
                if self._others_wait(stream):
                    self._measure_alone(stream, resume)
                    self._hand_over(job, stream)
                    return
            self._measure_alone(stream, resume)
            self._count(stream.result.new_tokens - job.counted)
            job.done(stream.result)
        except ChimeraError as exc:
            job.fail(APIError(400, str(exc)))
        except Exception as exc:  # a bug or a torch failure: answer 500 and keep the worker alive
            log.exception("generation %d failed", job.id)
            job.fail(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
        finally:
            if chunks is not None:
                chunks.close()  # frees the KV cache now instead of at the next garbage collection
