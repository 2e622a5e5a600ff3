"""`chimera serve` through the official openai client: same text as `chimera generate`, streaming, auth, bad input.

The server runs in a background thread on a loopback port with the tiny random Llama (real tokenizer and
chat template) and an untrained drafter, so every answer also goes through speculative verification.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from chimera import load_base
from chimera.drafters import resolve_drafter
from chimera.generate import SpeculativeDecoder
from chimera.server import BackgroundServer, Engine, ServerConfig

KEY = "sk-test-key"
MODEL = "tiny"
PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("random", model), tree="chain4")
    return Engine(decoder, max_queue=8, timeout=60)


@pytest.fixture(scope="module")
def url(engine):
    config = ServerConfig(MODEL, api_key=KEY, max_body_bytes=64 * 1024, body_timeout=2.0)
    with BackgroundServer(engine, config) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        yield http


def plain_decoder(tiny):
    model, tokenizer = tiny
    return SpeculativeDecoder(model, tokenizer, None)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_chat_equals_cli_generate(client, tiny_model_dir):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=24, temperature=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = subprocess.run([sys.executable, "-m", "chimera.cli", "generate", PROMPT, "--model", str(tiny_model_dir),
                          "--drafter", "none", "--max-new-tokens", "24", "--json"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert response.usage.completion_tokens == expected["new_tokens"]
    assert response.usage.prompt_tokens == expected["prompt_tokens"]
    assert response.usage.total_tokens == expected["new_tokens"] + expected["prompt_tokens"]
    assert response.id.startswith("chatcmpl-") and response.model == MODEL
    stats = response.model_extra["chimera"]
    assert stats["steps"] >= 1 and stats["tau"] > 0


def test_completion_equals_decoder(client, tiny):
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    expected = plain_decoder(tiny).generate("Once upon a time", raw=True, max_new_tokens=20)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == expected.new_tokens
    assert response.id.startswith("cmpl-")


def test_token_id_prompt(client, tiny):
    ids = tiny[1]("Once upon a time", add_special_tokens=True)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_streaming_chat_is_well_formed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last, usage = chunks
    assert [c.choices[0].finish_reason for c in body] == [None] * len(body)
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert "chimera" in last.model_extra
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content


def test_streaming_completion_with_stop(client, tiny):
    full = plain_decoder(tiny).generate("Once upon a time", raw=True, max_new_tokens=20).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stop=[stop], stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0.8,
                   top_p=0.9, seed=1234)
    first = client.chat.completions.create(**request).choices[0].message.content
    second = client.chat.completions.create(**request).choices[0].message.content
    assert first == second
    top_k = client.chat.completions.create(**request, extra_body={"top_k": 5}).choices[0].message.content
    assert top_k == client.chat.completions.create(**request, extra_body={"top_k": 5}).choices[0].message.content


def test_models_health_metrics(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(http.base_url.join("/health")).json()  # no key needed: liveness probes
    assert health["status"] == "ok" and health["model"] == MODEL
    text = http.get("/metrics").text
    for name in ("chimera_requests_total", "chimera_tokens_total", "chimera_tau", "chimera_request_duration_seconds",
                 "chimera_queue_depth"):
        assert f"# TYPE {name} " in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0 for line in samples)
    tau = float(next(line for line in samples if line.startswith("chimera_tau ")).split()[1])
    assert tau >= 1.0
    # where the decoding thread's time went: every kind listed, and the requests served so far among them
    work = {line.split('"')[1]: float(line.split()[-1]) for line in samples
            if line.startswith("chimera_worker_operations_total")}
    assert set(work) == {"join", "step", "alone", "into_batch", "out_of_batch"}
    assert work["alone"] + work["join"] >= 1


def test_api_key(url):
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert_error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}), 401,
                 code="invalid_api_key")
    assert_error(httpx.get(url + "/metrics", headers={"Authorization": f"Basic {KEY}"}), 401)


CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return json.dumps({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 4, **fields}).encode()


BAD_REQUESTS = {
    "malformed json": (CHAT, b'{"model": "tiny", "messages": [', 400, None, None),
    "not an object": (CHAT, b'["tiny"]', 400, None, None),
    "empty body": (CHAT, b"", 400, None, None),
    "invalid utf-8": (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None,
                      None),
    "lone surrogate": (CHAT, chat(messages=[{"role": "user", "content": "\ud800"}]), 400,
                       None, None),
    "nan": (CHAT, chat().replace(b'"max_tokens": 4', b'"temperature": NaN'), 400, None, None),
    "missing messages": (CHAT, json.dumps({"model": MODEL}).encode(), 400, "messages", None),
    "missing model": (CHAT, json.dumps({"messages": OK_MESSAGES}).encode(), 400, "model", None),
    "empty messages": (CHAT, chat(messages=[]), 400, "messages", None),
    "blank messages": (CHAT, chat(messages=[{"role": "user", "content": "   "}]), 400, "messages", None),
    "content not a string": (CHAT, chat(messages=[{"role": "user", "content": 7}]), 400, "messages.0.content", None),
    "unknown role": (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role", None),
    "messages not a list": (CHAT, chat(messages="hi"), 400, "messages", None),
    "max_tokens zero": (CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    "max_tokens negative": (CHAT, chat(max_tokens=-5), 400, "max_tokens", None),
    "max_tokens huge": (CHAT, chat(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
    "max_tokens a string": (CHAT, chat(max_tokens="10"), 400, "max_tokens", None),
    "max_tokens a bool": (CHAT, chat(max_tokens=True), 400, "max_tokens", None),
    "max_tokens disagree": (CHAT, chat(max_completion_tokens=8), 400, "max_tokens", None),
    "temperature too high": (CHAT, chat(temperature=5), 400, "temperature", None),
    "top_p zero": (CHAT, chat(top_p=0), 400, "top_p", None),
    "stream a string": (CHAT, chat(stream="yes"), 400, "stream", None),
    "n > 1": (CHAT, chat(n=2), 400, "n", "unsupported_parameter"),
    "logprobs": (CHAT, chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    "presence_penalty": (CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter"),
    "tools": (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    "json mode": (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", None),
    "unknown field": (CHAT, chat(temprature=0), 400, "temprature", None),
    "too many stops": (CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    "unknown model": (CHAT, chat(model="gpt-4"), 404, "model", "model_not_found"),
    "prompt over the context": (CHAT, chat(messages=[{"role": "user", "content": "word " * 700}]), 400, "messages",
                                "context_length_exceeded"),
    "prompt missing": (TEXT, json.dumps({"model": MODEL}).encode(), 400, "prompt", None),
    "prompt batch": (TEXT, json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt", None),
    "prompt empty": (TEXT, json.dumps({"model": MODEL, "prompt": "  "}).encode(), 400, "prompt", None),
    "token id out of range": (TEXT, json.dumps({"model": MODEL, "prompt": [1, 10**9]}).encode(), 400, "prompt", None),
    "echo": (TEXT, json.dumps({"model": MODEL, "prompt": "a", "echo": True}).encode(), 400, "echo", None),
    "nested 30,000 deep": (CHAT, b'{"model": "tiny", "metadata": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400,
                            None, None),
    "nested 40 deep": (CHAT, chat(metadata={"a": json.loads("[" * 40 + "]" * 40)}), 400, None, None),
    "temperature 1e-300": (CHAT, chat(temperature=1e-300), 400, "temperature", None),
    "temperature 5e-324": (CHAT, chat(temperature=5e-324), 400, "temperature", None),
    "temperature 1e-300 streamed": (CHAT, chat(temperature=1e-300, stream=True), 400, "temperature", None),
    "seed -1": (CHAT, chat(seed=-1, temperature=1), 400, "seed", None),
    "seed -1 streamed": (CHAT, chat(seed=-1, temperature=1, stream=True), 400, "seed", None),
    "seed past 2**64 streamed": (CHAT, chat(seed=2**64, stream=True), 400, "seed", None),
    "top_k negative streamed": (TEXT, json.dumps({"model": MODEL, "prompt": "a", "top_k": -1, "stream": True}).encode(),
                                400, "top_k", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_json_4xx(http, name):
    path, body, status, param, code = BAD_REQUESTS[name]
    assert_error(http.post(path, content=body, headers={"Content-Type": "application/json"}), status, param, code)


def errors_counted(http) -> float:
    """Server errors (5xx) so far, from /metrics."""
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("chimera_requests_total{") and 'status="5' in line)


def raw_request(url: str, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request whose body is cut short, then wait ``wait`` s for an answer (b"" if none)."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(head + body)
        if wait == 0:
            return b""
        sock.settimeout(wait)
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""


def test_a_client_gone_mid_body_is_no_server_error(http, url):
    before = errors_counted(http)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()
    for _ in range(5):
        raw_request(url, head, b'{"model": "tiny", "mess', wait=0)  # sends 23 of 500 bytes, then closes
    answer = raw_request(url, head, b'{"model": "tiny"', wait=5)  # stalls: the server gives up after 2 s
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert errors_counted(http) == before
    assert http.get("/health").json()["status"] == "ok"


def test_oversized_body(http):
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    assert_error(http.post(CHAT, content=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 8192

    assert_error(http.post(CHAT, content=chunked()), 413, code="request_too_large")


def test_unknown_routes_and_methods(http):
    assert_error(http.get("/v1/engines"), 404)
    assert_error(http.get(CHAT), 405)


def test_still_serving_after_bad_input(client):
    response = client.chat.completions.create(model=MODEL, messages=OK_MESSAGES, max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason in ("length", "stop")


def test_serve_cli_errors_are_one_line(capsys):
    import socket

    from chimera.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for argv, needle in [(["--port", "70000"], "--port"), (["--api-key", " "], "API key"),
                             (["--max-queue", "0"], "--max-queue"),
                             (["--port", str(busy.getsockname()[1])], "cannot listen")]:
            assert main(["serve", *argv]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("chimera: error:") and needle in err, err
    finally:
        busy.close()
