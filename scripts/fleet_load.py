"""Load figures for `chimera fleet`: requests/s of 1 and 2 replicas under the same load, and a replica killed
mid-load (how many requests failed, and whether any had not started streaming: those must never fail).

    .venv/bin/python scripts/fleet_load.py                       # a tiny random Llama (load_test.py's)
    .venv/bin/python scripts/fleet_load.py --model smollm2-135m-instruct --drafter auto --max-tokens 64

A local Ray cluster with as many CPUs as this machine has; each replica holds one of them (Ray's num_cpus=1,
one torch thread). The load generator is load_test.py's (streaming OpenAI clients). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import openai
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).parent))
from load_test import build_tiny_model, load  # noqa: E402

from chimera.server import ServerConfig  # noqa: E402
from chimera.server import fleet  # noqa: E402
from chimera.server.run import EngineOptions  # noqa: E402


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each process on this machine, by name (Ray's actors name themselves)."""
    import psutil

    used: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])[:60] or proc.info["name"]
            name = cmd.split("::", 1)[1].split()[0] if cmd.startswith("ray::") else (
                "load generator and driver" if proc.pid == os.getpid() else proc.info["name"])
            times = proc.info["cpu_times"]
            used[name] = used.get(name, 0.0) + times.user + times.system
        except (psutil.Error, TypeError, IndexError):
            continue
    return used


def measured(run, *args) -> dict:
    """``run(*args)``'s report, with the CPU seconds each process used during it (those above 0.5 s)."""
    before = cpu_seconds()
    report = asyncio.run(run(*args))
    after = cpu_seconds()
    spent = {name: round(after[name] - before.get(name, 0.0), 1) for name in after}
    report["cpu_seconds_by_process"] = dict(sorted(((k, v) for k, v in spent.items() if v >= 0.5),
                                                   key=lambda kv: -kv[1]))
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load_with_a_kill(url: str, model: str, clients: int, requests: int, max_tokens: int,
                           kill_after: float) -> dict:
    """``clients`` streaming clients; one replica is killed ``kill_after`` seconds in."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    outcomes = []

    async def one(prompt: str):
        chunks, finish, error, replica = 0, None, None, None
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                stream=True)
            replica = raw.headers.get(fleet.REPLICA_HEADER.decode())
            async for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        except openai.APIError as exc:
            error = str(exc)[:160]
        outcomes.append({"chunks": chunks, "finish": finish, "error": error, "replica": replica})

    async def worker(i: int):
        for j in range(requests):
            await one(f"Tell me about the number {i * requests + j}.")

    async def killer():
        await asyncio.sleep(kill_after)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::chimera#chimera-replica#")]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        return names[0].rsplit("#", 1)[1]

    t0 = time.perf_counter()
    killed, _ = await asyncio.gather(killer(), asyncio.gather(*(worker(i) for i in range(clients))))
    wall = time.perf_counter() - t0
    await client.close()
    failed = [o for o in outcomes if o["finish"] is None]
    return {"clients": clients, "requests": len(outcomes), "killed_after_s": kill_after, "killed_replica": killed,
            "completed": len(outcomes) - len(failed), "failed_after_streaming": sum(o["chunks"] > 0 for o in failed),
            "failed_before_streaming": sum(o["chunks"] == 0 for o in failed),
            "failed_on_the_killed_replica": sum(o["replica"] == killed for o in failed),
            "error_samples": sorted({o["error"] for o in failed})[:2], "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to serve (default: a tiny random Llama)")
    parser.add_argument("--drafter", default="none")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--kill-after", type=float, default=None,
                        help="seconds into a last run on the most replicas when one is killed (default: half the "
                             "duration of that run's load)")
    args = parser.parse_args()

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="chimera-fleet-")
        model = tmp.name
        build_tiny_model(Path(model))
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    report = {"model": "tiny random Llama (load_test.py's)" if tmp else model, "drafter": args.drafter,
              "cpus": cpus, "cpus_per_replica": 1, "torch_threads_per_replica": 1, "runs": {}}
    port = free_port()
    options = EngineOptions(model=model, device="cpu", drafter=args.drafter, max_queue=4 * args.clients)
    try:
        for count in args.replicas:
            url = fleet.run(options, ServerConfig(model), fleet.FleetOptions(replicas=count), "127.0.0.1", port,
                            block=False)
            asyncio.run(load(url, "none", model, 2, 2, args.max_tokens))  # warm-up
            report["runs"][f"{count} replicas"] = measured(load, url, "none", model, args.clients, args.requests,
                                                           args.max_tokens)
        runs = report["runs"]
        first, last = runs[f"{args.replicas[0]} replicas"], runs[f"{args.replicas[-1]} replicas"]
        report["requests_per_s_ratio"] = round(last["requests_per_s"] / first["requests_per_s"], 2)
        url = fleet.run(options, ServerConfig(model), fleet.FleetOptions(replicas=args.replicas[-1]), "127.0.0.1",
                        port, block=False)
        asyncio.run(load(url, "none", model, 2, 1, args.max_tokens))
        kill_after = args.kill_after or last["wall_s"] / 2
        report["kill"] = asyncio.run(load_with_a_kill(url, model, args.clients, args.requests, args.max_tokens,
                                                      kill_after))
        report["kill"]["after_the_kill"] = asyncio.run(load(url, "none", model, 2, 2, args.max_tokens))
        print(json.dumps(report, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
