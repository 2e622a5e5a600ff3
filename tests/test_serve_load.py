"""`chimera serve` under load: concurrent streams, queue overflow, client disconnects, deadlines, memory.

Plain decoding of the tiny random Llama keeps each request around a tenth of a second, so 160 streams fit
in a test. Every loop is bounded in count and in time, and only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import gc
import time

import httpx
import openai
import psutil
import pytest

from chimera import load_base
from chimera.generate import SpeculativeDecoder
from chimera.server import BackgroundServer, Engine, ServerConfig

MODEL = "tiny"
QUEUE = 16
PROMPTS = ["Name a color.", "Count to five.", "Say hello.", "What is two plus two?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def server(tiny):
    engine = Engine(SpeculativeDecoder(*tiny, None), max_queue=QUEUE, timeout=60)
    with BackgroundServer(engine, ServerConfig(MODEL)) as url:
        yield url, engine


def wait_idle(engine: Engine, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not engine.busy and engine.queued == 0:
            return True
        time.sleep(0.02)
    return False


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def stream_one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    """One streamed chat answer, checked chunk by chunk; returns (text, finish_reason)."""
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, stream=True)
    ids, parts, finish = set(), [], []
    async for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk" and len(chunk.choices) == 1
        choice = chunk.choices[0]
        assert not finish, "a chunk after the finish_reason"
        if choice.finish_reason is not None:
            finish.append(choice.finish_reason)
        parts.append(choice.delta.content or "")
    assert len(ids) == 1 and len(finish) == 1
    return "".join(parts), finish[0]


async def run_clients(url: str, clients: int, requests: int, max_tokens: int, expected: dict) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    async def worker(i: int) -> int:
        done = 0
        for j in range(requests):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            text, finish = await stream_one(client, prompt, max_tokens)
            assert (text, finish) == expected[prompt]
            done += 1
        return done

    try:
        return sum(await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(clients))), timeout=240))
    finally:
        await client.close()


def test_concurrent_streams_complete_and_memory_is_steady(server):
    url, engine = server
    sync = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    expected = {}
    for prompt in PROMPTS:
        r = sync.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12,
                                         temperature=0)
        expected[prompt] = (r.choices[0].message.content, r.choices[0].finish_reason)
    process = psutil.Process()
    assert asyncio.run(run_clients(url, 16, 2, 12, expected)) == 32  # warm-up: allocator and caches settle
    gc.collect()
    before = process.memory_info().rss
    assert asyncio.run(run_clients(url, 16, 10, 12, expected)) == 160
    gc.collect()
    growth = process.memory_info().rss - before
    assert growth < 48 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 160 streamed requests"
    assert wait_idle(engine, 5)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_queue_overflow_answers_429(server):
    url, engine = server

    async def burst(n: int):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48,
                    "temperature": 0}
            return await asyncio.wait_for(asyncio.gather(*(http.post("/v1/chat/completions", json=body)
                                                           for _ in range(n))), timeout=120)

    responses = asyncio.run(burst(3 * QUEUE))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= QUEUE
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
    assert wait_idle(engine, 10)
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
    assert metric(url, 'chimera_requests_total{route="/v1/chat/completions",status="429"}') >= 1


class SlowVerifier:
    """Each base forward 5 ms slower: a 460-token answer then outlasts the disconnect polls on any machine."""

    def __init__(self, inner):
        self.inner = inner

    def start(self, capacity: int):
        session = self.inner.start(capacity)
        score = session.score

        def slow_score(*args):
            time.sleep(0.005)
            return score(*args)

        session.score = slow_score
        return session


def test_disconnect_cancels_generation(server, monkeypatch):
    url, engine = server
    monkeypatch.setattr(engine.decoder, "verifier", SlowVerifier(engine.decoder.verifier))
    cancelled = metric(url, 'chimera_generations_total{outcome="cancelled"}')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 460,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line)
            assert next(events).startswith("data: ")  # the role chunk, sent before the worker takes the job
            assert next(events).startswith("data: ")  # a first text delta: the worker is generating
            assert engine.busy
    # the stream is closed after one event: the worker must stop long before 460 tokens (over 2.3 s here)
    assert wait_idle(engine, 0.8)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
    assert wait_idle(engine, 0.8)  # noticed at the next disconnect poll (every 0.5 s)
    assert metric(url, 'chimera_generations_total{outcome="cancelled"}') >= cancelled + 2


def test_request_timeout(tiny):
    engine = Engine(SpeculativeDecoder(*tiny, None), max_queue=4, timeout=0.3)
    with BackgroundServer(engine, ServerConfig(MODEL)) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 460}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in client.chat.completions.create(**body, stream=True):
                pass
        assert wait_idle(engine, 2)
        quick = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert quick.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("drafting", [False, True], ids=["plain batch", "drafting batch"])
def test_a_running_batch_under_load_loses_nothing(tiny, drafting):
    """Continuous batching with clients that leave mid-stream, a burst past the queue and long requests beside
    short ones: every stream that stays is complete and is what that request decodes alone; also where the batch
    drafts a chain for every row (a drafter of random weights: most of its drafts rejected, rows moved as members
    leave)."""
    drafter = None
    if drafting:
        from chimera.drafters.chimera import ChimeraDrafter

        drafter = ChimeraDrafter.for_base(tiny[0], num_draft_heads=6).eval()
    decoder = SpeculativeDecoder(*tiny, drafter, tree="small" if drafting else "auto", adaptive=False)
    expected = {}
    for prompt in PROMPTS:
        r = decoder.generate([{"role": "user", "content": prompt}], max_new_tokens=12)
        expected[prompt] = (r.text, r.finish_reason)
    engine = Engine(decoder, max_queue=QUEUE, timeout=60, max_batch=4, batch_drafting=drafting)
    with BackgroundServer(engine, ServerConfig(MODEL)) as url:
        cancelled = metric(url, 'chimera_generations_total{outcome="cancelled"}')

        async def leaver():
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 460,
                    "temperature": 0, "stream": True}
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = response.aiter_lines()
                    for _ in range(3):  # the role chunk and two text deltas, then the client is gone
                        while not (await lines.__anext__()):
                            pass

        async def burst(n: int):
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
                        "temperature": 0}
                return [r.status_code for r in await asyncio.gather(*(http.post("/v1/chat/completions", json=body)
                                                                      for _ in range(n)))]

        async def together(*jobs):
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=240)

        # a burst past the queue while two members of the batch leave: 200 or 429, nothing else
        statuses, _, _ = asyncio.run(together(burst(3 * QUEUE), leaver(), leaver()))
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= QUEUE - 2, statuses
        # streams beside members that leave: every one complete and what it is alone
        streamed, _, _ = asyncio.run(together(run_clients(url, 6, 4, 12, expected), leaver(), leaver()))
        assert streamed == 24
        assert wait_idle(engine, 10)
        assert metric(url, 'chimera_generations_total{outcome="cancelled"}') >= cancelled + 4
        assert metric(url, "chimera_running_generations") == 0
        quick = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert quick.status_code == 200
    assert (engine.batch.counts.drafted > 0) == drafting  # the drafting batch drafted (its switch off: always)


def test_a_request_longer_than_a_batch_row_waits_and_is_decoded_alone(tiny):
    """With rows of 64 tokens, a 200-token request cannot join the batch: it waits until the batch is empty and
    is then decoded alone, complete and correct, while the short ones batch."""
    decoder = SpeculativeDecoder(*tiny, None)
    messages = [{"role": "user", "content": "Go on forever."}]
    long_expected = decoder.generate(messages, max_new_tokens=200)
    short_expected = {p: decoder.generate([{"role": "user", "content": p}], max_new_tokens=12) for p in PROMPTS}
    engine = Engine(decoder, max_queue=QUEUE, timeout=60, max_batch=4, batch_context=64)
    with BackgroundServer(engine, ServerConfig(MODEL)) as url:
        async def everything():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            try:
                calls = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                        max_tokens=12, temperature=0) for p in PROMPTS * 2]
                calls.append(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200,
                                                            temperature=0))
                return await asyncio.wait_for(asyncio.gather(*calls), timeout=120)
            finally:
                await client.close()

        answers = asyncio.run(everything())
        for prompt, answer in zip(PROMPTS * 2, answers):
            assert answer.choices[0].message.content == short_expected[prompt].text
        assert answers[-1].choices[0].message.content == long_expected.text
        assert answers[-1].usage.completion_tokens == long_expected.new_tokens
        assert wait_idle(engine, 5)


def test_a_request_decoded_alone_moves_into_the_batch_when_others_arrive(tiny):
    """A long request alone is decoded on its own; requests that arrive meanwhile do not wait for it to end: it
    moves into the running batch and they join it. Every text is what it is alone."""
    decoder = SpeculativeDecoder(*tiny, None)
    long_messages = [{"role": "user", "content": "Go on forever."}]
    long_expected = decoder.generate(long_messages, max_new_tokens=400)
    short_expected = {p: decoder.generate([{"role": "user", "content": p}], max_new_tokens=12) for p in PROMPTS}
    engine = Engine(decoder, max_queue=QUEUE, timeout=60, max_batch=4)
    with BackgroundServer(engine, ServerConfig(MODEL)) as url:
        async def scenario():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

            async def short(prompt: str):
                answer = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
                return answer.choices[0].message.content, time.monotonic()

            try:
                stream = await client.chat.completions.create(model=MODEL, messages=long_messages, max_tokens=400,
                                                              temperature=0, stream=True)
                text = ""
                async for chunk in stream:
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                    if len(text) > 8:
                        break
                assert engine.running == 1 and engine._current is not None  # alone, mid-way
                shorts = asyncio.gather(*(short(p) for p in PROMPTS))
                async for chunk in stream:
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                return text, time.monotonic(), await shorts
            finally:
                await client.close()

        text, long_ended, shorts = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert text == long_expected.text and long_expected.new_tokens == 400
        for prompt, (answer, ended) in zip(PROMPTS, shorts):
            assert answer == short_expected[prompt].text
            assert ended < long_ended  # served beside the long one, not after it
        assert wait_idle(engine, 5)
    # where the worker's time went: one lone decoding, ended by its move into the batch (counted apart), a join per
    # short request, and batch steps
    counts, seconds = engine.spent.counts, engine.spent.seconds
    assert (counts["alone"], counts["into_batch"], counts["join"], counts["out_of_batch"]) == (1, 1, len(PROMPTS), 0)
    assert counts["step"] > 0 and min(seconds.values()) >= 0


@pytest.mark.slow
def test_speculation_resumes_when_the_batch_is_down_to_one(default_model):
    """A long request is decoded alone (speculatively), moves into the batch when a short one arrives, and goes
    back to decoding alone with the drafter once the short one has left: text as alone, for both."""
    from chimera.drafters import resolve_drafter

    model, tokenizer = default_model
    # a tree given, not calibrated: the calibration may choose plain decoding on this machine (it does on an Intel
    # Xeon), and this test is about speculation resuming
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="5")
    long_messages = [{"role": "user", "content": "List the planets of the solar system with one fact each."}]
    short_messages = [{"role": "user", "content": "Say hi."}]
    long_expected = decoder.generate(long_messages, max_new_tokens=96)
    short_expected = decoder.generate(short_messages, max_new_tokens=4)
    resumed = []
    resume = decoder.resume
    decoder.resume = lambda progress: resumed.append(len(progress.stopper.tokens)) or resume(progress)
    engine = Engine(decoder, max_queue=QUEUE, timeout=60, max_batch=4)
    with BackgroundServer(engine, ServerConfig("smollm2-135m-instruct")) as url:
        async def scenario():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            try:
                long_call = asyncio.ensure_future(client.chat.completions.create(
                    model="smollm2-135m-instruct", messages=long_messages, max_tokens=96, temperature=0))
                while engine._current is None:  # the long one is decoding alone
                    await asyncio.sleep(0.01)
                short = await client.chat.completions.create(model="smollm2-135m-instruct", messages=short_messages,
                                                             max_tokens=4, temperature=0)
                return await long_call, short
            finally:
                await client.close()

        long_answer, short_answer = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert long_answer.choices[0].message.content == long_expected.text
    assert short_answer.choices[0].message.content == short_expected.text
    assert len(resumed) == 1 and 0 < resumed[0] < long_expected.new_tokens  # back to speculation mid-way
    counts = engine.spent.counts  # alone, into the batch, out of it, alone again
    assert (counts["alone"], counts["into_batch"], counts["out_of_batch"], counts["join"]) == (2, 1, 1, 1)


def test_the_last_member_goes_alone_only_where_it_pays():
    from chimera.server.engine import Speeds

    speeds = Speeds()
    assert not speeds.worth_going_alone(known=50, remaining=200)  # nothing measured yet
    speeds.batch_of_one.add(0.030)
    speeds.prefill.add(0.001)
    # alone not measured: taken as half a batch step, 15 ms a token saved
    assert speeds.worth_going_alone(known=50, remaining=200)  # 3.0 s saved against 0.05 s
    assert not speeds.worth_going_alone(known=1000, remaining=40)  # 0.6 s saved against 1.0 s
    speeds.alone.add(0.029)  # alone measured barely faster: a long answer no longer pays for a long prompt
    assert not speeds.worth_going_alone(known=1000, remaining=200)
    assert speeds.worth_going_alone(known=10, remaining=200)  # 0.2 s against 0.01 s
    # a move that copies the KV costs a prefill until measured, then what it measured
    speeds.alone.value = 0.015
    assert not speeds.worth_going_alone(known=1000, remaining=40, copied=True)
    speeds.move.add(0.0001)
    assert speeds.worth_going_alone(known=1000, remaining=40, copied=True)  # 0.6 s against 0.1 s
    assert not speeds.worth_going_alone(known=1000, remaining=40, copied=False)
