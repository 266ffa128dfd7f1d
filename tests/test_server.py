"""The server through its real interfaces: the openai client streaming, the admin route, disconnects."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import aiohttp
import openai
import pytest

from dopd.testing import transformers_greedy
from dopd.workers.loader import load_tokenizer
from serverproc import ServerProcess

NUM_REQUESTS = 16
NEW_TOKENS = 16
LONG_TOKENS = 1000  # long enough that a move lands while requests are decoding, even when the
# server answers the move a second or two after it was asked (a loaded CI machine streaming 16 requests)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(3)
    words = "alpha beta gamma delta import class def return value node tree list string".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(2, 40))) for _ in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def reference(llama_dir, texts) -> list[str]:
    tokenizer = load_tokenizer(llama_dir)
    tokens, _ = transformers_greedy(llama_dir, [tokenizer.encode(t) for t in texts], NEW_TOKENS)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]  # as the server streams


async def stream_all(url: str, model: str, texts: list[str], max_tokens: int = NEW_TOKENS) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")

    async def one(text: str) -> str:
        stream = await client.completions.create(model=model, prompt=text, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    try:
        return await asyncio.gather(*(one(t) for t in texts))
    finally:
        await client.close()


@pytest.mark.parametrize("mode", [["--mode", "static", "--pd-ratio", "1:1"], ["--mode", "colocated"]],
                         ids=["static-1P1D", "colocated"])
def test_openai_streaming_equals_transformers(llama_dir, texts, reference, mode):
    server = ServerProcess("--model", str(llama_dir), "--gpus", "2", *mode)
    try:
        got = asyncio.run(stream_all(server.url, str(llama_dir), texts))
        assert got == reference
        snap = server.wait_idle()
        assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
        assert snap["latency"]["num_finished"] == NUM_REQUESTS and snap["latency"]["num_failed"] == 0
    finally:
        assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def server3(llama_dir):
    server = ServerProcess("--model", str(llama_dir), "--gpus", "3", "--mode", "static", "--pd-ratio", "1:2",
                           "--kv-cache-gb", "0.05")
    yield server
    assert server.stop() == 0, server.logs()


def test_random_disconnects_leave_every_pool_whole(server3, texts):
    async def run() -> int:
        rng = random.Random(0)
        body = {"max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
        aborted = 0
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> None:
                nonlocal aborted
                cut_after = rng.choice([0, 1, 3, 10, None])  # chunks to read before hanging up
                async with session.post(server3.url + "/v1/completions",
                                        json={**body, "prompt": texts[i % len(texts)]}) as resp:
                    assert resp.status == 200
                    n = 0
                    async for _ in resp.content:
                        n += 1
                        if cut_after is not None and n >= cut_after:
                            aborted += 1
                            return  # leaving the context closes the connection mid-stream
            await asyncio.gather(*(one(i) for i in range(40)))
        return aborted

    assert asyncio.run(run()) > 10
    snap = server3.wait_idle()
    assert snap["num_requests"] == 0
    for w in snap["workers"]:
        assert w["kv_blocks_free"] == w["kv_blocks_total"], snap


def test_moving_workers_by_hand_under_load_changes_nothing(server3, llama_dir, texts):
    # The same requests without a move are the reference (that they equal transformers' is
    # test_openai_streaming_equals_transformers's business; at this length its reference costs ~30 s).
    unmoved = asyncio.run(stream_all(server3.url, str(llama_dir), texts, LONG_TOKENS))
    server3.wait_idle()

    async def run():
        streams = asyncio.create_task(stream_all(server3.url, str(llama_dir), texts, LONG_TOKENS))
        async with aiohttp.ClientSession() as session:
            while True:  # move once worker 2 is decoding something: sequences running, blocks in use
                async with session.get(server3.url + "/v1/cluster") as r:
                    seen = (await r.json())["workers"][2]
                if seen["num_running"] >= 2 and seen["kv_blocks_free"] < seen["kv_blocks_total"]:
                    break
                await asyncio.sleep(0.02)
            # worker 0: prefill -> decode, worker 2: decode -> prefill (its running decodes migrate)
            async with session.post(server3.url + "/v1/cluster/roles",
                                    json={"roles": {"0": "decode", "2": "prefill"}, "reason": "test",
                                          "migrate": True}) as r:
                assert r.status == 200, await r.text()
                moves = (await r.json())["moves"]
        return moves, seen, await streams

    moves, seen, got = asyncio.run(run())
    assert {(m["worker"], m["from"], m["to"]) for m in moves} == {(0, "prefill", "decode"), (2, "decode", "prefill")}
    assert got == unmoved
    snap = server3.wait_idle()
    assert [w["role"] for w in snap["workers"]] == ["decode", "decode", "prefill"]
    done = {(m["worker"], m["to"]): m for m in snap["role_changes"]}
    assert {(0, "decode"), (2, "prefill")} <= set(done)
    # its running decodes moved to the other decode worker
    assert done[(2, "prefill")]["num_migrated"] > 0, (done[(2, "prefill")], seen, server3.logs()[-4000:])
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
    # and back, so the split is usable for whatever runs next on this server
    server3.post("/v1/cluster/roles", {"roles": {"0": "prefill", "2": "decode"}})


def test_bad_role_requests_are_400(server3):
    async def run():
        async with aiohttp.ClientSession() as session:
            for body in ({"roles": {"9": "decode"}}, {"roles": {"0": "sideways"}},
                         {"roles": {"0": "decode", "1": "decode", "2": "decode"}}, {"roles": "x"}):
                async with session.post(server3.url + "/v1/cluster/roles", json=body) as r:
                    assert r.status == 400
                    assert "message" in (await r.json())["error"]
    asyncio.run(run())


def test_a_shared_prompt_prefix_is_computed_once(server3, llama_dir, texts):
    """Through the API: the second of two prompts that start alike reports the first's KV as cached
    (OpenAI's usage.prompt_tokens_details), and the counters on /metrics add it up."""
    prefix = " ".join(texts)
    num_prefix = len(load_tokenizer(llama_dir).encode(prefix))
    before = _prefix_cache_hits(server3)

    async def run():
        client = openai.AsyncOpenAI(base_url=server3.url + "/v1", api_key="unused")
        try:
            first = await client.completions.create(model=str(llama_dir), prompt=prefix + " one", max_tokens=4,
                                                    temperature=0)
            second = await client.completions.create(model=str(llama_dir), prompt=prefix + " two", max_tokens=4,
                                                     temperature=0)
            return first.usage, second.usage
        finally:
            await client.close()

    first, second = asyncio.run(run())
    block = 16
    assert second.prompt_tokens_details.cached_tokens >= (num_prefix - block) // block * block > 0
    assert second.prompt_tokens_details.cached_tokens > first.prompt_tokens_details.cached_tokens
    hits = _prefix_cache_hits(server3) - before
    assert hits == first.prompt_tokens_details.cached_tokens + second.prompt_tokens_details.cached_tokens
    snap = server3.wait_idle()
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
    assert any(w["kv_blocks_cached"] for w in snap["workers"] if w["role"] == "prefill")
    assert 0 < snap["latency"]["prefix_cache_hit_rate"] < 1


def _prefix_cache_hits(server) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                return float(line.split()[-1])
    return 0.0


def test_a_prompt_is_routed_to_the_prefill_worker_holding_its_prefix(llama_dir, texts):
    """Two prefill workers: a prompt whose prefix worker 0 prefilled goes there, though worker 0 has
    a prompt queued and worker 1 nothing, because its cache saves more than the queue costs."""
    server = ServerProcess("--model", str(llama_dir), "--gpus", "3", "--mode", "static", "--pd-ratio", "2:1")
    prefix = " ".join(texts * 4)  # ~1,100 tokens
    model = str(llama_dir)

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        try:
            await client.completions.create(model=model, prompt=prefix + " one", max_tokens=2, temperature=0)
            # Worker 0 holds the prefix; a 300-token prompt is queued on it when the second arrives.
            other = " ".join(reversed(texts))
            _, second = await asyncio.gather(
                client.completions.create(model=model, prompt=other, max_tokens=2, temperature=0),
                client.completions.create(model=model, prompt=prefix + " two", max_tokens=2, temperature=0))
            return second.usage
        finally:
            await client.close()

    try:
        num_prefix = len(load_tokenizer(llama_dir).encode(prefix))
        usage = asyncio.run(run())
        assert usage.prompt_tokens_details.cached_tokens >= (num_prefix - 16) // 16 * 16
        snap = server.wait_idle()
        assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
    finally:
        assert server.stop() == 0, server.logs()


def test_workers_sharing_a_gpu_each_size_their_pool_for_a_share():
    """More workers than GPUs (the H200 device machine has one): each worker is told how many share its
    GPU, so that workers starting together, each seeing the GPU empty, never ask for more than it has."""
    from dataclasses import replace

    from dopd.config import ClusterConfig, DopdConfig, ModelConfig
    from dopd.server import resolve, worker_specs

    cfg = DopdConfig(model=ModelConfig(model="tiny"), cluster=ClusterConfig(gpus=3, device="cpu"))
    setup = replace(resolve(cfg), device="cuda")  # no GPU here: torch counts none, so all three share cuda:0
    specs = worker_specs(cfg, setup)
    assert [s.runner.device for s in specs] == ["cuda:0"] * 3
    assert [s.runner.workers_on_device for s in specs] == [3, 3, 3]
    assert all(s.runner.workers_on_device == 1 for s in worker_specs(cfg, resolve(cfg)))  # CPU: a pool each
