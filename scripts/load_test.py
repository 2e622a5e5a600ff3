"""Load figures for `chimera serve`: requests/s, latency percentiles, and what a burst past the queue gets.

    .venv/bin/python scripts/load_test.py                       # starts `chimera serve` on a tiny random Llama
    .venv/bin/python scripts/load_test.py --model smollm2-135m-instruct --drafter auto --max-tokens 64
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8000 [--api-key KEY]

The server runs in its own process (started here unless --url is given) so the load generator does not
share its interpreter. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

PROMPTS = ["Name a color.", "Count to five.", "Say hello.", "What is two plus two?", "Write a haiku about rain."]


def build_tiny_model(path: Path) -> None:
    """A 2-layer random Llama with the default model's tokenizer and chat template: fast, realistic text path."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chimera import load_base

    _, tokenizer = load_base("smollm2-135m-instruct", device="cpu")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)


def start_server(args, model: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "chimera.cli", "serve", "--model", model, "--drafter", args.drafter,
               "--port", "0", "--max-queue", str(args.max_queue), "--device", "cpu"]
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()  # "chimera: serving '...' on http://127.0.0.1:PORT (...)"
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip() or 'no output'}")
    url = line.split(" on ", 1)[1].split()[0]
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), as chimera throughput computes it."""
    from chimera.bench.throughput import percentile as fraction_percentile

    return fraction_percentile(values, q / 100) if values else float("nan")


async def one_stream(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, finish = None, 0, None
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if finish is None:
        raise RuntimeError("stream ended without a finish_reason")
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


async def load(url: str, key: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    results, errors = [], []

    async def worker(i: int):
        for j in range(requests):
            try:
                results.append(await one_stream(client, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens))
            except Exception as exc:  # counted and reported, never fatal: the figure is the point
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests_per_client": requests, "max_tokens": max_tokens, "completed": len(results),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 2), "completion_tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(percentile(latency, 50), 3), "latency_p99_s": round(percentile(latency, 99), 3),
            "latency_mean_s": round(statistics.fmean(latency), 3) if latency else None,
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3)}


async def burst(url: str, key: str, model: str, n: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n)),
                                         return_exceptions=True)
        wall = time.perf_counter() - t0
        health = (await http.get("/health")).json()
        after = await http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    statuses: dict[str, int] = {}
    refusal = None
    for r in responses:
        status = str(r.status_code) if isinstance(r, httpx.Response) else type(r).__name__
        statuses[status] = statuses.get(status, 0) + 1
        if isinstance(r, httpx.Response) and r.status_code == 429 and refusal is None:
            refusal = {"error": r.json()["error"], "retry_after": r.headers.get("retry-after")}
    return {"concurrent_requests": n, "statuses": statuses, "wall_s": round(wall, 2), "first_refusal": refusal,
            "health_after": health["status"], "request_after_status": after.status_code}


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default=None, help="model to serve (default: a tiny random Llama)")
    parser.add_argument("--drafter", default="none", help="drafter for the started server (default: none)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16, help="queue size of the started server")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="running batch of the started server (default: the server's own, 16 on a CPU)")
    parser.add_argument("--burst", type=int, default=None, help="concurrent requests at once (default: 3 x queue)")
    args = parser.parse_args()

    proc, tmp = None, None
    if args.url:
        url = args.url.rstrip("/")
        model = args.model or httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}
                                        ).json()["data"][0]["id"]
    else:
        model = args.model
        if model is None:
            tmp = tempfile.TemporaryDirectory(prefix="chimera-load-")
            model = tmp.name
            build_tiny_model(Path(model))
        proc, url = start_server(args, model)
    pid = proc.pid if proc else None
    try:
        asyncio.run(load(url, args.api_key, model, 2, 2, args.max_tokens))  # warm-up
        rss_before = rss_mib(pid)
        report = {"url": url, "model": "tiny random Llama (2 layers, width 64, real SmolLM2 tokenizer)"
                  if tmp else model, "drafter": args.drafter if proc else "(server's own)",
                  "max_batch": args.max_batch if proc else "(server's own)",
                  "cpu_threads": os.cpu_count(),
                  "load": asyncio.run(load(url, args.api_key, model, args.clients, args.requests, args.max_tokens))}
        report["rss_mib_before_after_load"] = [rss_before, rss_mib(pid)]
        report["overflow"] = asyncio.run(burst(url, args.api_key, model, args.burst or 3 * args.max_queue,
                                               4 * args.max_tokens))
        report["rss_mib_after_overflow"] = rss_mib(pid)
        print(json.dumps(report, indent=1))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
