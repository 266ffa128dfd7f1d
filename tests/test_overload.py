"""Overload: admission past `--max-num-requests` is a 429 with Retry-After, what was admitted still
completes, the main process's memory stays flat across bursts, and a decode pool too small for the
load slows prefill down (backpressure) instead of deadlocking or failing requests.

One server for all: 1 prefill and 2 decode workers of 24 KV blocks (384 tokens) each, 8 requests
in flight at most."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from serverproc import ServerProcess, stream_request

MAX_REQUESTS = 8
BODY = dict(temperature=0, ignore_eos=True, stream_options={"include_usage": True})


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def prompt(n: int, salt: int) -> list[int]:
    return [300 + (salt * 13 + i * 7) % 2000 for i in range(n)]


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "tiny", "--engine", "mock", "--gpus", "3", "--mode", "static",
                           "--pd-ratio", "1:2", "--num-kv-blocks", "24", "--max-num-requests", str(MAX_REQUESTS),
                           "--log-level", "warning")
    yield server
    assert server.stop() == 0, server.logs()


def test_past_the_limit_is_429_and_the_admitted_complete(server):
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            admitted = [asyncio.create_task(stream_request(s, server.url, {**BODY, "prompt": prompt(10, i),
                                                                           "max_tokens": 100}))
                        for i in range(MAX_REQUESTS)]
            deadline = time.monotonic() + 20
            while (await (await s.get(server.url + "/v1/cluster")).json())["num_requests"] < MAX_REQUESTS:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            rejected = []
            for stream in (True, False):
                async with s.post(server.url + "/v1/completions",
                                  json={"prompt": "one more", "max_tokens": 5, "stream": stream}) as r:
                    rejected.append((r.status, r.headers.get("Retry-After"), r.content_type, await r.json()))
            chat = await stream_request(s, server.url, {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 5}, path="/v1/chat/completions")
            return await asyncio.gather(*admitted), rejected, chat

    results, rejected, chat = asyncio.run(run())
    for status, retry_after, content_type, body in rejected:
        assert status == 429 and retry_after is not None and int(retry_after) >= 1
        assert content_type == "application/json"
        assert body["error"]["type"] == "rate_limit_error" and "busy" in body["error"]["message"]
    assert chat.status == 429 and chat.headers.get("Retry-After") and chat.error["type"] == "rate_limit_error"
    assert all(r.ok and r.usage["completion_tokens"] == 100 for r in results), results
    snap = server.wait_idle()
    assert snap["num_requests"] == 0
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])


def test_memory_stays_flat_across_bursts(server):
    """Bursts of 200 requests (most of them turned away with 429, some cut by the client): the main
    process's RSS after the last burst is within a few MiB of its RSS after the first."""
    async def burst(s: aiohttp.ClientSession, seed: int) -> dict:
        counts = {"ok": 0, "429": 0, "cut": 0}

        async def one(i: int) -> None:
            r = await stream_request(s, server.url, {**BODY, "prompt": prompt(20 + i % 50, seed * 1000 + i),
                                                     "max_tokens": 40}, cut_after=3 if i % 5 == 0 else None)
            key = "cut" if r.cut else "ok" if r.ok else str(r.status)
            counts[key] = counts.get(key, 0) + 1

        await asyncio.gather(*(one(i) for i in range(200)))
        return counts

    async def run() -> list[int]:
        samples = []
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
            for seed in range(5):
                counts = await burst(s, seed)
                assert counts["429"] > 0 and counts["ok"] > 0 and set(counts) <= {"ok", "429", "cut"}, counts
                server.wait_idle()
                samples.append(rss_kib(server.proc.pid))
        return samples

    samples = asyncio.run(run())
    assert samples[-1] - samples[0] < 8 * 1024, f"RSS grew across bursts (KiB): {samples}"
    snap = server.wait_idle()
    assert snap["num_requests"] == 0 and all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])


def num_errors(server: ServerProcess) -> float:
    """Requests the server has ended with an error, client disconnects included (its Prometheus counter)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("dopd:requests_total{") and 'outcome="error"' in line:
                return float(line.split()[-1])
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_full_decode_pool_applies_backpressure(server):
    """24 blocks (384 tokens) per worker; 8 requests of 200 prompt tokens (13 blocks) that end at
    350 tokens (22 blocks): one fits on each decode worker at a time and one parked on the prefill
    worker, which must wait for the decode side (without spinning) before it can prefill the next.
    All complete with every token, none fails, the pools end whole; and a request that could never
    fit in one pool is refused up front (400) instead of waiting forever."""
    prefill_pid = server.get("/v1/cluster")["workers"][0]["pid"]

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            return await asyncio.gather(*(stream_request(s, server.url, {**BODY, "prompt": prompt(200, i),
                                                                         "max_tokens": 150})
                                          for i in range(8)))

    started, cpu_before, errors_before = time.monotonic(), cpu_seconds(prefill_pid), num_errors(server)
    results = asyncio.run(run())
    elapsed, cpu = time.monotonic() - started, cpu_seconds(prefill_pid) - cpu_before
    assert all(r.ok and r.usage["completion_tokens"] == 150 for r in results), results
    snap = server.wait_idle()
    assert snap["num_requests"] == 0, snap
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"]), snap["workers"]
    assert num_errors(server) == errors_before
    # waiting for blocks is blocking on the pipe, not a busy loop of empty steps
    assert cpu < 0.2 * elapsed, f"prefill worker used {cpu:.2f} s of CPU in {elapsed:.2f} s while it waited"
    limit = server.get("/v1/models")["data"][0]["max_model_len"]
    assert 350 <= limit <= 24 * 16
    with pytest.raises(urllib.error.HTTPError) as e:
        server.post("/v1/completions", {"prompt": prompt(300, 0), "max_tokens": 100})
    assert e.value.code == 400 and "maximum context length" in json.loads(e.value.read())["error"]["message"]


def test_clients_gone_while_parked_for_decode_room(server):
    """Half the streams hang up after their first token, while their KV sits parked on the prefill
    worker waiting for room on a full decode pool: their blocks come back, the rest complete."""
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            return await asyncio.gather(*(stream_request(s, server.url, {**BODY, "prompt": prompt(200, 50 + i),
                                                                         "max_tokens": 150},
                                                         cut_after=1 if i % 2 else None) for i in range(8)))

    results = asyncio.run(run())
    assert all(r.cut for r in results[1::2]) and all(r.ok for r in results[::2]), results
    snap = server.wait_idle()
    assert snap["num_requests"] == 0
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"]), snap["workers"]
