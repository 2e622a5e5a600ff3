"""Server counters in the Prometheus text format, written by hand (the format is a few lines of text).

Everything is updated from the event loop; a lock still guards the numbers so the worker thread or a
scrape from another thread can never see a half-written histogram.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {count}'
               for bound, count in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]
        return out


class Metrics:
    """Requests by route and status, tokens, decode steps (tau = tokens / steps), latency, queue state."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.first_token = Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.generations: dict[str, int] = defaultdict(int)  # by outcome: stop, length, cancelled, timeout, error

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency[route].observe(seconds)

    def first_token_after(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def generation(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0, steps: int = 0) -> None:
        with self._lock:
            self.generations[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.steps += steps

    def render(self, queued: int, busy: bool, running: int = 0, tokens_per_s: float = 0.0, worker=None) -> str:
        """Prometheus text; ``worker``: the engine's ``WorkerTime`` (where its decoding thread spent its time)."""
        with self._lock:
            out = ["# HELP chimera_requests_total HTTP requests by route and status code.",
                   "# TYPE chimera_requests_total counter"]
            out += [f'chimera_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP chimera_request_duration_seconds Time from request to the end of the response.",
                    "# TYPE chimera_request_duration_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                out += hist.lines("chimera_request_duration_seconds", f'route="{route}"')
            out += ["# HELP chimera_time_to_first_token_seconds Time from request to the first streamed text.",
                    "# TYPE chimera_time_to_first_token_seconds histogram"]
            out += self.first_token.lines("chimera_time_to_first_token_seconds")
            out += ["# HELP chimera_generations_total Generations by outcome.",
                    "# TYPE chimera_generations_total counter"]
            out += [f'chimera_generations_total{{outcome="{k}"}} {n}' for k, n in sorted(self.generations.items())]
            out += ["# HELP chimera_tokens_total Prompt and completion tokens of finished generations.",
                    "# TYPE chimera_tokens_total counter",
                    f'chimera_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                    f'chimera_tokens_total{{kind="completion"}} {self.completion_tokens}',
                    "# HELP chimera_decode_steps_total Base forwards of finished generations (prefill included).",
                    "# TYPE chimera_decode_steps_total counter",
                    f"chimera_decode_steps_total {self.steps}",
                    "# HELP chimera_tau Completion tokens per base forward over all finished generations.",
                    "# TYPE chimera_tau gauge",
                    f"chimera_tau {self.completion_tokens / self.steps if self.steps else 0.0:.4f}"]
        out += ["# HELP chimera_queue_depth Requests waiting for the decoder.",
                "# TYPE chimera_queue_depth gauge",
                f"chimera_queue_depth {queued}",
                "# HELP chimera_busy 1 while a generation runs.",
                "# TYPE chimera_busy gauge",
                f"chimera_busy {int(busy)}",
                "# HELP chimera_running_generations Generations in progress (the running batch, or one alone).",
                "# TYPE chimera_running_generations gauge",
                f"chimera_running_generations {running}",
                "# HELP chimera_tokens_per_second Tokens emitted per second over the last 10 seconds.",
                "# TYPE chimera_tokens_per_second gauge",
                f"chimera_tokens_per_second {tokens_per_s:.2f}"]
        if worker is not None:
            spent = worker.to_dict()
            out += ["# HELP chimera_worker_seconds_total Seconds the decoding thread spent, by kind of work: joining "
                    "the running batch, its steps, decoding alone, moving into and out of the batch.",
                    "# TYPE chimera_worker_seconds_total counter"]
            out += [f'chimera_worker_seconds_total{{work="{kind}"}} {part["seconds"]:.4f}'
                    for kind, part in spent.items()]
            out += ["# HELP chimera_worker_operations_total How often the decoding thread did each kind of work.",
                    "# TYPE chimera_worker_operations_total counter"]
            out += [f'chimera_worker_operations_total{{work="{kind}"}} {part["count"]}'
                    for kind, part in spent.items()]
        out += ["# HELP process_resident_memory_bytes Resident memory of the server process.",
                "# TYPE process_resident_memory_bytes gauge",
                f"process_resident_memory_bytes {resident_bytes()}",
                "# HELP process_start_time_seconds Start of the server, seconds since the epoch.",
                "# TYPE process_start_time_seconds gauge",
                f"process_start_time_seconds {self.started:.3f}"]
        return "\n".join(out) + "\n"


def resident_bytes() -> int:
    """Resident set size from /proc (Linux); 0 elsewhere rather than a dependency for one number."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
