"""Worker faults: `kill -9` of a worker during prefill, decode, a KV handoff and a role move.

Each time the controller must notice within a second (state "dead"), bring a fresh process back in
the same slot and role ("serving", `restarts` + 1), re-place the requests that had produced no
token, end the others with an explicit error (an SSE error event, then [DONE]), leave every pool
whole, and keep serving throughout.

The mock engine makes the windows wide enough to hit: llama3-8b on an H100 prefills 16k tokens in
~0.5 s, and a 0.01 GB/s link makes pulling one 16-token block of its KV take ~0.2 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from serverproc import ServerProcess, stream_request, wait_for

PREFILL, DECODE_A, DECODE_B = 0, 1, 2
PAYLOAD = dict(temperature=0, ignore_eos=True, stream_options={"include_usage": True})


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "tiny", "--engine", "mock", "--model-profile", "llama3-8b", "--link", "0.01",
                           "--gpus", "3", "--mode", "static", "--pd-ratio", "1:2", "--handoff-timeout", "30",
                           "--log-level", "warning")
    yield server
    assert server.stop() == 0, server.logs()


def prompt(n: int, salt: int = 0) -> list[int]:
    return [300 + (salt * 31 + i * 7) % 2000 for i in range(n)]


async def cluster(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/v1/cluster") as r:
        return await r.json()


async def poll(session, url, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = await cluster(session, url)
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {snap['workers']}")
        await asyncio.sleep(0.02)


async def kill_worker(session, url: str, wid: int) -> dict:
    """kill -9 a worker; return its entry as it was, once the controller has marked it dead (≤ 1 s)."""
    before = (await cluster(session, url))["workers"][wid]
    assert before["state"] != "dead"
    os.kill(before["pid"], signal.SIGKILL)
    killed = time.monotonic()
    seen = await poll(session, url, lambda s: s["workers"][wid]["restarts"] == before["restarts"] + 1, 5.0,
                      f"worker {wid} to be noticed dead")
    assert time.monotonic() - killed < 1.0, "the controller took over a second to notice a dead worker"
    assert seen["workers"][wid]["state"] in ("dead", "starting")
    return before


async def back_serving(session, url: str, before: dict, timeout: float = 60.0) -> dict:
    """Wait for the replacement process: serving again, same slot and role, a new pid, restarts + 1."""
    wid = before["id"]
    snap = await poll(session, url, lambda s: s["workers"][wid]["state"] == "serving", timeout,
                      f"worker {wid} to come back")
    w = snap["workers"][wid]
    assert w["restarts"] == before["restarts"] + 1 and w["pid"] != before["pid"]
    assert w["role"] == before["role"]
    return snap


async def one(session, url, n_prompt, max_tokens, salt=0, on_chunk=None):
    body = {**PAYLOAD, "prompt": prompt(n_prompt, salt), "max_tokens": max_tokens}
    return await stream_request(session, url, body, on_chunk=on_chunk)


def assert_whole(server: ServerProcess) -> dict:
    snap = server.wait_idle(30)
    assert snap["num_requests"] == 0, snap
    for w in snap["workers"]:
        assert w["state"] == "serving", snap["workers"]
        assert w["kv_blocks_free"] == w["kv_blocks_total"], snap["workers"]
    return snap


def assert_ended_explicitly(results, max_tokens: int) -> tuple[int, int]:
    """Every stream ended: all its tokens, or an error event followed by [DONE]. Returns (ok, errored)."""
    ok = errored = 0
    for r in results:
        assert r.status == 200 and r.done, r
        if r.error is None:
            assert r.usage["completion_tokens"] == max_tokens, r
            ok += 1
        else:
            assert r.error["type"] == "server_error" and "lost" in r.error["message"], r.error
            errored += 1
    return ok, errored


async def healthy_request(session, url) -> None:
    r = await one(session, url, 12, 8, salt=99)
    assert r.ok and r.usage["completion_tokens"] == 8, r


def test_kill_during_prefill_replaces_the_prompts(server):
    """Long prompts queued on the only prefill worker: none has a token yet, so all are re-placed on
    its replacement and complete; a request sent while it is down completes too."""
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            tasks = [asyncio.create_task(one(s, server.url, 16000, 1, salt=i)) for i in range(6)]
            await poll(s, server.url, lambda snap: snap["workers"][PREFILL]["num_waiting"] >= 3, 20,
                       "prompts queued on the prefill worker")
            before = await kill_worker(s, server.url, PREFILL)
            during = asyncio.create_task(healthy_request(s, server.url))
            await back_serving(s, server.url, before)
            results = await asyncio.gather(*tasks)
            await during
            await healthy_request(s, server.url)
            return results

    results = asyncio.run(run())
    assert all(r.ok and r.usage["completion_tokens"] == 1 for r in results), results
    assert_whole(server)


def test_kill_during_decode_ends_its_streams_with_an_error(server):
    """Streams decoding on the killed worker end with an error event; those on the other decode
    worker and new ones sent meanwhile complete."""
    max_tokens = 300

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            tasks = [asyncio.create_task(one(s, server.url, 10, max_tokens, salt=i)) for i in range(8)]
            await poll(s, server.url, lambda snap: min(snap["workers"][w]["num_running"]
                                                       for w in (DECODE_A, DECODE_B)) >= 2, 30, "decodes on both")
            before = await kill_worker(s, server.url, DECODE_A)
            await healthy_request(s, server.url)  # while it is down: decoded by the other one
            await back_serving(s, server.url, before)
            await healthy_request(s, server.url)
            return await asyncio.gather(*tasks)

    ok, errored = assert_ended_explicitly(asyncio.run(run()), max_tokens)
    assert ok >= 2 and errored >= 2, (ok, errored)
    assert_whole(server)


@pytest.mark.parametrize("victim", ["source", "puller"])
def test_kill_during_handoff(server, victim):
    """Two KV pulls in flight (prompts of 6 blocks, ~1.2 s each on this link), one per decode worker.
    Killing the prefill worker that holds the KV fails both; killing one puller fails its request
    only, and the source's blocks come back either way."""
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            tasks = [asyncio.create_task(one(s, server.url, 90, 20, salt=i)) for i in range(2)]
            await poll(s, server.url, lambda snap: snap["workers"][PREFILL]["num_parked"] == 2, 20,
                       "two requests parked on the prefill worker")
            before = await kill_worker(s, server.url, PREFILL if victim == "source" else DECODE_A)
            await back_serving(s, server.url, before)
            results = await asyncio.gather(*tasks)
            await healthy_request(s, server.url)
            return results

    results = asyncio.run(run())
    ok, errored = assert_ended_explicitly(results, 20)
    if victim == "source":
        assert errored == 2, results
    else:  # routing spreads the two pulls over both decode workers; only the killed one's fails
        assert errored >= 1 and ok + errored == 2, results
    for r in results:
        if r.error is not None:
            assert "KV handoff" in r.error["message"], r.error
    assert_whole(server)


def test_client_gone_during_handoff_frees_both_sides(server):
    """The client hangs up while its KV is being pulled: the pull finishes into blocks that are then
    dropped, the source's blocks are released, nothing is left on the controller."""
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            task = asyncio.create_task(stream_request(s, server.url, {**PAYLOAD, "prompt": prompt(90, 7),
                                                                      "max_tokens": 20}, cut_after=1))
            await poll(s, server.url, lambda snap: snap["workers"][PREFILL]["num_parked"] == 1, 20, "a pull")
            return await task

    assert asyncio.run(run()).cut
    assert_whole(server)


def test_kill_during_role_move(server):
    """Kill a decode worker while it migrates its running decodes away on its way to prefill: the
    move is dropped, the worker comes back as it was (decode), every stream ends, and a later move
    of the same worker completes."""
    max_tokens = 400

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            tasks = [asyncio.create_task(one(s, server.url, 10, max_tokens, salt=i)) for i in range(8)]
            await poll(s, server.url, lambda snap: snap["workers"][DECODE_B]["num_running"] >= 3, 30,
                       "decodes on the worker to move")
            body = {"roles": {str(DECODE_B): "prefill"}, "reason": "test", "migrate": True}
            async with s.post(server.url + "/v1/cluster/roles", json=body) as r:
                assert r.status == 200 and (await r.json())["moves"], await r.text()
            snap = await cluster(s, server.url)
            assert snap["moves_in_progress"] and snap["workers"][DECODE_B]["target_role"] == "prefill"
            before = await kill_worker(s, server.url, DECODE_B)
            assert not (await cluster(s, server.url))["moves_in_progress"]
            await healthy_request(s, server.url)
            await back_serving(s, server.url, before)
            results = await asyncio.gather(*tasks)
            await healthy_request(s, server.url)
            return results

    ok, errored = assert_ended_explicitly(asyncio.run(run()), max_tokens)
    assert errored >= 1 and ok >= 1, (ok, errored)
    assert_whole(server)
    # the slot moves fine now, and back
    for role in ("prefill", "decode"):
        server.post("/v1/cluster/roles", {"roles": {str(DECODE_B): role}})
        wait_for(lambda: server.get("/v1/cluster")["workers"][DECODE_B]["role"] == role, 10, what=f"role {role}")
    assert_whole(server)


def test_a_request_is_re_placed_at_most_twice():
    """In-process, on the controller alone: a request whose worker dies before its first token is
    re-placed, but after two such losses a third ends it with an error: a request that kills every
    worker it lands on (a poison pill) must not take the prefill workers down one after another."""
    from dopd.controller import Controller
    from dopd.embedded import resolve_model
    from dopd.messages import AddRequest, Role, WorkerStats
    from dopd.metrics import SLO
    from dopd.request import Request
    from dopd.sampling_params import SamplingParams
    from dopd.telemetry import Telemetry
    from dopd.workers.handle import WorkerHandle, WorkerState
    from dopd.workers.loader import load_tokenizer
    from dopd.workers.worker import WorkerSpec

    sent: dict[int, list] = {0: [], 1: [], 2: []}
    handles = []
    for i, role in enumerate((Role.PREFILL, Role.PREFILL, Role.DECODE)):
        h = WorkerHandle(WorkerSpec(i, None, None, 8, 512, frozenset()), role)
        h.state, h.block_size, h.num_blocks = WorkerState.SERVING, 16, 64
        h.stats = WorkerStats(0, 0, 0, 64, 64, 0, 0.0, 0, 0)
        h.send = lambda msg, i=i: sent[i].append(msg) or True
        handles.append(h)
    tokenizer = load_tokenizer(resolve_model("tiny"))
    ctl = Controller(handles, tokenizer, 256, Telemetry("tiny", SLO(1.0, 0.1)), request_timeout=60,
                     handoff_timeout=10, max_num_requests=8)
    st = ctl.submit(Request("r", None, [300] * 20, SamplingParams(max_tokens=4), 4, tokenizer))
    ctl.closing = True  # no respawn tasks: the test revives workers by hand
    for _ in range(2):
        on = st.worker
        assert isinstance(sent[on][-1], AddRequest)
        ctl._on_exit(handles[on])
        assert st.worker not in (None, on) and not st.request.finished  # re-placed on the other one
        handles[on].state = WorkerState.SERVING
    ctl._on_exit(handles[st.worker])
    assert st.request.finished and "3 workers lost" in st.request.error
    assert not ctl.requests and not ctl.unplaced
