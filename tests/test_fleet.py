"""A serving fleet on Ray Serve (the cluster extra): the front's retry rule on fakes, then 2 replicas of the
default model on a local Ray cluster: the OpenAI client streams from it, load reaches both replicas, and a
replica killed under load loses no request that had not started streaming.

The cluster tests are marked ``cluster`` and bounded: every client call has a timeout and the whole load
runs under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from chimera.server import ServerConfig  # noqa: E402
from chimera.server.fleet import REPLICA_HEADER, FleetOptions, ForwardedRequest, Front  # noqa: E402
from chimera.server.run import EngineOptions  # noqa: E402
from chimera.server.schemas import APIError  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Name a color.", "Count to five.", "Say hello.", "What is two plus two?"]


# ---- the front's rule, on fake replicas ------------------------------------------------------------------

def start(status=200, content_type=b"text/event-stream"):
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}


def body(data: bytes, more: bool):
    return {"type": "http.response.body", "body": data, "more_body": more}


class FakeStream:
    """A replica's answer: its messages, then optionally the replica's death."""

    def __init__(self, messages, dies_after: int | None = None, error=ActorDiedError):
        self.messages, self.dies_after, self.error = list(messages), dies_after, error
        self.cancelled = False
        self.index = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.dies_after is not None and self.index >= self.dies_after:
            raise self.error()
        if self.index >= len(self.messages):
            raise StopAsyncIteration
        self.index += 1
        return [self.messages[self.index - 1]]  # a replica sends lists of the messages ready together

    def cancel(self):
        self.cancelled = True


class FakeReplicas:
    """A deployment handle whose calls answer with the given streams, in order."""

    def __init__(self, streams):
        self.streams = list(streams)
        self.calls = 0
        self.forward = self

    def options(self, **kwargs):
        return self

    def remote(self, request):
        self.calls += 1
        return self.streams.pop(0)


async def relayed(response) -> bytes:
    sent = []

    async def send(message):
        sent.append(message)

    await response({"type": "http"}, None, send)
    assert sent[0]["type"] == "http.response.start"
    return b"".join(m.get("body", b"") for m in sent[1:])


REQUEST = ForwardedRequest("POST", "/v1/chat/completions", b"", ((b"content-type", b"application/json"),), b"{}",
                           None)


async def answer(fr) -> bytes:
    """What the client receives (dispatch and relay in one event loop, as in the front)."""
    return await relayed(await fr.dispatch(REQUEST))


def front(streams, timeout=30.0):
    replicas = FakeReplicas(streams)
    return Front(replicas, ServerConfig(MODEL), timeout=timeout, max_queue=4), replicas


def test_a_replica_that_dies_before_the_first_bytes_costs_the_client_nothing():
    messages = [start(), body(b"", True), body(b"data: one\n\n", True), body(b"data: [DONE]\n\n", False)]
    died_at_once = FakeStream([], dies_after=0)
    died_after_headers = FakeStream([start(), body(b"", True)], dies_after=2)  # headers, no bytes yet
    good = FakeStream(messages)
    fr, replicas = front([died_at_once, died_after_headers, good])
    assert asyncio.run(answer(fr)) == b"data: one\n\ndata: [DONE]\n\n"
    assert replicas.calls == 3
    assert good.cancelled  # released once relayed


def test_a_replica_that_dies_mid_stream_ends_it_with_an_error_event():
    fr, replicas = front([FakeStream([start(), body(b"data: one\n\n", True)], dies_after=2)])
    data = asyncio.run(answer(fr))
    assert replicas.calls == 1  # bytes had left: not sent again
    assert data.startswith(b"data: one\n\n")
    assert b'"code": "replica_stopped"' in data and data.endswith(b"\n\n")


def test_the_front_gives_up_after_three_dead_replicas_and_maps_backpressure_to_429():
    fr, replicas = front([FakeStream([], dies_after=0) for _ in range(3)])
    with pytest.raises(APIError) as failed:
        asyncio.run(fr.dispatch(REQUEST))
    assert failed.value.status == 503 and failed.value.code == "no_replica" and replicas.calls == 3

    fr, _ = front([FakeStream([], dies_after=0, error=lambda: BackPressureError(num_queued_requests=4,
                                                                                  max_queued_requests=4))])
    with pytest.raises(APIError) as busy:
        asyncio.run(fr.dispatch(REQUEST))
    assert busy.value.status == 429 and busy.value.headers == {"Retry-After": "1"}


def test_a_request_no_replica_starts_within_the_timeout_gets_504():
    class Stalled(FakeStream):
        async def __anext__(self):
            await asyncio.sleep(10)

    stalled = Stalled([])
    fr, _ = front([stalled], timeout=0.2)
    with pytest.raises(APIError) as late:
        asyncio.run(fr.dispatch(REQUEST))
    assert late.value.status == 504 and stalled.cancelled


def test_fleet_options_fixed_or_autoscaled():
    fixed = FleetOptions(replicas=2).deployment_options(max_batch=8, max_queue=16)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 8 and fixed["max_queued_requests"] == 16
    scaled = FleetOptions(replicas=1, max_replicas=4).deployment_options(max_batch=8, max_queue=16)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                            "target_ongoing_requests": 4.0}


# ---- 2 replicas of the default model on a local Ray cluster ------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(default_model):  # default_model: the GGUF converted once, before two replicas want it at once
    from ray import serve

    from chimera.server import fleet as fleet_module

    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    try:
        # a batch of 2 per replica: the rest of the load waits in Ray's queue, as a fleet's overflow does
        options = EngineOptions(model=MODEL, device="cpu", max_batch=2, max_queue=64, timeout=120)
        url = fleet_module.run(options, ServerConfig(MODEL), FleetOptions(replicas=2), "127.0.0.1", free_port(),
                               block=False)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


async def stream(client, prompt: str, max_tokens: int, replicas: list | None = None) -> dict:
    """One streamed chat completion: its text, its chunks, how it ended and which replica served it."""
    record = {"text": "", "chunks": 0, "finish": None, "error": None, "replica": None}
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True)
        record["replica"] = raw.headers.get(REPLICA_HEADER.decode())
        if replicas is not None:
            replicas.append(record["replica"])
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                record["text"] += chunk.choices[0].delta.content
                record["chunks"] += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                record["finish"] = chunk.choices[0].finish_reason
    except openai.APIError as exc:
        record["error"] = str(exc)
    return record


@pytest.mark.cluster
@pytest.mark.slow
def test_the_fleet_streams_like_chimera_serve_and_spreads_load(fleet):
    async def scenario():
        client = openai.AsyncOpenAI(base_url=fleet + "/v1", api_key="none", max_retries=0, timeout=120)
        alone = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                     max_tokens=24, temperature=0)
        streamed = await stream(client, PROMPTS[0], 24)
        together = await asyncio.gather(*(stream(client, PROMPTS[i % 4], 24) for i in range(8)))
        await client.close()
        return alone, streamed, together

    async def bounded():
        async with asyncio.timeout(240):
            return await scenario()

    alone, streamed, together = asyncio.run(bounded())
    assert streamed["finish"] == alone.choices[0].finish_reason and streamed["text"] == alone.choices[0].message.content
    assert all(r["finish"] and r["error"] is None for r in together)
    assert all(r["text"] == streamed["text"] for r in together[0::4])  # greedy: the same text under load
    assert len({r["replica"] for r in together}) == 2, "the load reached one replica only"
    # errors are chimera serve's; /health and /metrics cover every replica
    bad = httpx.post(fleet + "/v1/chat/completions", json={"model": "other", "messages": []}, timeout=30)
    assert bad.status_code in (400, 404) and "error" in bad.json()
    health = httpx.get(fleet + "/health", timeout=30).json()
    assert health["status"] == "ok" and set(health["replicas"]) == {r["replica"] for r in together}
    scrape = httpx.get(fleet + "/metrics", timeout=30).text
    for replica in health["replicas"]:
        assert f'chimera_requests_total{{replica="{replica}",route="/v1/chat/completions",status="200"}}' in scrape
    assert scrape.count("# TYPE chimera_requests_total counter") == 1


@pytest.mark.cluster
@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request_that_had_not_started_streaming(fleet):
    from ray import serve

    killed = []

    async def scenario():
        client = openai.AsyncOpenAI(base_url=fleet + "/v1", api_key="none", max_retries=0, timeout=120)
        replicas: list[str] = []
        tasks = [asyncio.ensure_future(stream(client, PROMPTS[i % 4], 48, replicas)) for i in range(12)]
        while not replicas:  # the first answer's headers: that replica is decoding now
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        victim = replicas[0]
        name = f"SERVE_REPLICA::chimera#chimera-replica#{victim}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed.append(victim)
        results = await asyncio.gather(*tasks)
        after = await stream(client, PROMPTS[1], 8)
        await client.close()
        return results, after

    async def bounded():
        async with asyncio.timeout(300):
            return await scenario()

    results, after = asyncio.run(bounded())
    failed = [r for r in results if r["finish"] is None]
    for r in failed:  # only requests that had started streaming on the killed replica may fail, and cleanly
        assert r["replica"] == killed[0] and r["chunks"] > 0 and "replica" in r["error"], r
    completed = [r for r in results if r["finish"] is not None]
    assert completed and all(r["error"] is None for r in completed)
    by_prompt = {}
    for i, r in enumerate(results):
        if r["finish"] is not None:
            by_prompt.setdefault(i % 4, set()).add(r["text"])
    assert all(len(texts) == 1 for texts in by_prompt.values())  # whoever served them, the same text
    assert after["finish"] and after["error"] is None  # the fleet keeps serving
    deadline = time.monotonic() + 120  # and Ray brings the fleet back to 2 replicas
    while time.monotonic() < deadline:
        status = serve.status().applications["chimera"].deployments["chimera-replica"]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2


def test_rays_serve_run_builds_the_same_application_and_checks_its_arguments():
    """`serve run chimera.server.fleet:app_builder key=value ...` takes chimera fleet's options, checked alike."""
    from ray.serve import Application

    from chimera.errors import ChimeraError
    from chimera.server.fleet import app_builder

    assert isinstance(app_builder({"model": MODEL, "replicas": "2", "max_batch": "4", "port": "8001"}), Application)
    with pytest.raises(ChimeraError, match="replicas"):
        app_builder({"model": MODEL, "replicas": "0"})
    with pytest.raises(ChimeraError, match="unrecognized"):
        app_builder({"model": MODEL, "no_such_option": "1"})


def test_replicas_metrics_merge_into_one_scrape_with_a_replica_label():
    from chimera.server.fleet import merge_metrics

    one = ('# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{route="/x",status="200"} 3\n'
           '# HELP running Running.\n# TYPE running gauge\nrunning 1\n')
    two = ('# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{route="/x",status="200"} 5\n'
           '# HELP running Running.\n# TYPE running gauge\nrunning 0\n')
    merged = merge_metrics([("b", two), ("a", one)])
    assert merged == ('# HELP requests_total Requests.\n# TYPE requests_total counter\n'
                      'requests_total{replica="a",route="/x",status="200"} 3\n'
                      'requests_total{replica="b",route="/x",status="200"} 5\n'
                      '# HELP running Running.\n# TYPE running gauge\n'
                      'running{replica="a"} 1\nrunning{replica="b"} 0\n')
    assert merge_metrics([]) == ""


def test_health_and_metrics_while_no_replica_is_ready_answer_503():
    from ray.serve.exceptions import DeploymentUnavailableError
    from starlette.requests import Request

    class Deploying(FakeReplicas):
        def broadcast(self, method):
            raise DeploymentUnavailableError("chimera-replica")

    fr = Front(Deploying([]), ServerConfig(MODEL), timeout=30.0, max_queue=4)
    for path in ("/health", "/metrics"):
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
        response = asyncio.run(fr(Request(scope)))
        assert response.status_code == 503 and b'"code":"no_replica"' in response.body
