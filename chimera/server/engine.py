"""One worker thread owns the decoder; requests wait in a bounded queue and stream back to the event loop.

The model decodes one sequence at a time (batch 1), so a single thread runs every generation and the
asyncio event loop never blocks on torch. Each job carries a cancel event and a deadline that the worker
checks between stream chunks, so a client that disconnects or a request that runs out of time stops
costing compute within one decode step. Results cross back into the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import ChimeraError
from ..generate import GenerationResult, SpeculativeDecoder
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


class Engine:
    """A bounded queue in front of one ``SpeculativeDecoder`` run by one thread."""

    def __init__(self, decoder: SpeculativeDecoder, max_queue: int = 16, timeout: float = 120.0):
        if max_queue < 1:
            raise ChimeraError(f"the queue size must be at least 1, got {max_queue}")
        if not timeout > 0:
            raise ChimeraError(f"the request timeout must be positive, got {timeout}")
        self.decoder = decoder
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
        return self._current is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chimera-engine", daemon=True)
            self._thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """Refuse new work, fail what is queued, cancel what runs, and join the worker."""
        self._stopping.set()
        if self._current is not None:
            self._current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
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
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        job = Job(input_ids, max_new_tokens, stop, dict(sampling or {}), time.monotonic() + self.timeout,
                  asyncio.get_running_loop(), stream, id=next(self._ids))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping.is_set():
                if job is not None:
                    job.fail(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
                return
            self._current = job
            try:
                self._serve(job)
            finally:
                self._current = None

    def _serve(self, job: Job) -> None:
        job.started = time.monotonic()
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.fail(timeout_error(self.timeout))
            return
        chunks = None
        try:
            stream = self.decoder.stream(input_ids=job.input_ids, max_new_tokens=job.max_new_tokens, stop=job.stop,
                                         **job.sampling)
            chunks = iter(stream)
            for text in chunks:
                if job.stream:
                    job.delta(text)
                if job.cancelled.is_set():
                    return
                if time.monotonic() > job.deadline:
                    job.fail(timeout_error(self.timeout))
                    return
            job.done(stream.result)
        except ChimeraError as exc:
            job.fail(APIError(400, str(exc)))
        except Exception as exc:  # a bug or a torch failure: answer 500 and keep the worker alive
            log.exception("generation %d failed", job.id)
            job.fail(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
        finally:
            if chunks is not None:
                chunks.close()  # frees the KV cache now instead of at the next garbage collection
