"""The live dashboard: frames rendered from hand-made snapshots into a string, and its loops."""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import re

import pytest
from rich.console import Console

from dopd.monitor import BLOCKS, History, render, run_monitor, sparkline, watch


def worker(wid: int, role: str, state: str = "serving", target: str | None = None, running: int = 0,
           waiting: int = 0, parked: int = 0, free: int = 4096, step: float | None = None) -> dict:
    return {"id": wid, "pid": 1000 + wid, "role": role, "target_role": target, "state": state,
            "num_running": running, "num_waiting": waiting, "num_parked": parked, "kv_blocks_total": 4096,
            "kv_blocks_free": free, "step_time": step, "step_tokens": running, "pending_prefill_tokens": 0}


def idle_snapshot() -> dict:
    return {
        "time": 3.0, "num_requests": 0,
        "workers": [worker(0, "prefill"), worker(1, "prefill"), worker(2, "decode"), worker(3, "decode")],
        "queues": {"unplaced": 0, "handoff": 0, "prefill": 0, "decode": 0, "mixed": 0, "idle": 0},
        "latency": {"window_s": 60, "num_finished": 0, "num_failed": 0, "ttft_p50": None, "ttft_p90": None,
                    "tpot_p50": None, "tpot_p90": None, "slo_ttft": 1.5, "slo_tpot": 0.05, "slo_attainment": None,
                    "goodput_rps": 0.0, "throughput_rps": 0.0, "output_tokens_per_s": 0.0},
        "role_changes": [], "moves_in_progress": [], "policy": None,
    }


def busy_snapshot(t: float = 130.0, ttft_p90: float = 0.5) -> dict:
    snap = idle_snapshot()
    snap |= {
        "time": t, "num_requests": 42,
        "workers": [worker(0, "prefill", running=3, waiting=1, free=3000, step=0.012),
                    worker(1, "prefill", running=2, free=1024, step=0.02),
                    worker(2, "prefill", running=4, waiting=2, free=2048, step=0.015),
                    worker(3, "decode", running=30, parked=2, free=100, step=0.031),
                    worker(4, "decode", running=25, free=2000, step=0.028),
                    worker(5, "decode", running=27, free=1500, step=0.029),
                    worker(6, "decode", running=20, free=2500, step=0.027),
                    worker(7, "mixed", running=5, waiting=1, free=3500, step=0.04)],
        "queues": {"unplaced": 0, "handoff": 3, "prefill": 3, "decode": 0, "mixed": 1, "idle": 0},
        "latency": {"window_s": 60, "num_finished": 100, "num_failed": 1, "ttft_p50": 0.2, "ttft_p90": ttft_p90,
                    "tpot_p50": 0.03, "tpot_p90": 0.07, "slo_ttft": 1.5, "slo_tpot": 0.05, "slo_attainment": 0.97,
                    "goodput_rps": 3.2, "throughput_rps": 3.3, "output_tokens_per_s": 700.0,
                    "prefix_cache_hit_rate": 0.43},
        "role_changes": [
            {"worker": 2, "from": "decode", "to": "prefill", "reason": "ratio 3:1 for rate 4.2 req/s",
             "started_at": 100.0, "finished_at": 100.05, "duration_ms": 50.0, "num_migrated": 3, "migrate": True},
            {"worker": 7, "from": "prefill", "to": "mixed", "reason": "manual: POST /v1/cluster/roles",
             "started_at": 110.0, "finished_at": 110.012, "duration_ms": 12.0, "num_migrated": 0, "migrate": False},
        ],
        "policy": {"name": "dopd", "forecast": {"rate": 4.1, "mean_input_len": 1000, "mean_output_len": 200},
                   "target": {"prefill": 3, "decode": 4, "idle": 0, "ccd": 12, "ratio": 0.75}, "gpu_seconds": 123.0},
    }
    return snap


def flip_snapshot() -> dict:
    snap = busy_snapshot()
    snap["workers"][1] = worker(1, "prefill", state="migrating", target="decode", running=2, free=1024, step=0.02)
    snap["moves_in_progress"] = [{"worker": 1, "from": "prefill", "to": "decode", "reason": "prefill overprovisioned",
                                  "started_at": 128.5, "migrate": True}]
    return snap


def lost_snapshot() -> dict:
    snap = busy_snapshot()
    snap["workers"][4] = worker(4, "decode", state="dead")
    return snap


def text(snapshot: dict | None, history: History | None = None, width: int = 120, height: int = 40,
         **kw) -> str:
    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=False, color_system=None)
    console.print(render(snapshot, history, width=width, height=height, **kw))
    return console.file.getvalue()


def filled_history(n: int = 10) -> History:
    history = History()
    for i in range(n):
        history.add(busy_snapshot(t=100.0 + i, ttft_p90=0.3 + 0.2 * i))
    return history


SIZES = [(80, 24), (120, 40)]


@pytest.mark.parametrize("width,height", SIZES)
def test_idle(width: int, height: int) -> None:
    out = text(idle_snapshot(), width=width, height=height)
    assert out.count("serving") == 4
    assert "no requests finished yet" in out
    assert "no role changes yet" in out
    assert "handoff 0" in out and "prefill 0" in out
    assert "0%" in out
    assert "cached" not in out  # no prefill in the window (or caching off): nothing to say


@pytest.mark.parametrize("width,height", SIZES)
def test_busy(width: int, height: int) -> None:
    history = filled_history()
    out = text(busy_snapshot(), history, width=width, height=height)
    assert "p90 500ms" in out and "SLO 1.50s" in out  # TTFT p90 against its SLO
    assert "p90 70.0ms" in out and "SLO 50.0ms" in out  # TPOT p90, over its SLO
    assert "97.0%" in out and "goodput 3.20" in out
    assert "98%" in out and "27%" in out  # KV use of worker 3 (100 of 4096 free) and worker 0
    assert "700 tok/s" in out and "forecast 4.10 req/s" in out and "in flight 42" in out
    assert "cached 43%" in out  # the prompt tokens the prefix caches held
    assert any(glyph in out for glyph in BLOCKS[1:])
    assert "handoff 3" in out
    assert "target 3P 4D" in out and "12C" not in out  # only the roles of the policy's target


def test_slo_colours() -> None:
    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=True, color_system="truecolor")
    console.print(render(busy_snapshot(), filled_history(), 120, 40))
    out = console.file.getvalue()
    assert "\x1b[32m500ms" in out  # TTFT p90 within its SLO: green
    assert "\x1b[1;31m70.0ms" in out  # TPOT p90 over its SLO: bold red
    assert "\x1b[31m█" in out  # and the sparkline's samples over the SLO


@pytest.mark.parametrize("width,height", SIZES)
def test_mid_flip(width: int, height: int) -> None:
    out = text(flip_snapshot(), filled_history(), width=width, height=height)
    row = next(line for line in out.splitlines() if "prefill→decode" in line and "moving" not in line)
    assert row.split()[0].strip("│") in ("1", "") and "prefill" in row
    moving = next(line for line in out.splitlines() if "moving w1" in line)
    assert "prefill→decode" in moving and "migrate" in moving and "-1.5s" in moving
    assert "1 moving" in out


@pytest.mark.parametrize("width,height", SIZES)
def test_lost_worker_and_change_log(width: int, height: int) -> None:
    out = text(lost_snapshot(), filled_history(), width=width, height=height)
    lines = out.splitlines()
    assert "dead" in next(line for line in lines if line.lstrip("│ ").startswith("4 "))
    assert "1 lost" in out
    newest, older = (next(i for i, line in enumerate(lines) if f"w{w} " in line) for w in (7, 2))
    assert newest < older  # newest first
    assert "12ms drained" in lines[newest] and "manual: POST" in lines[newest]
    assert "50ms 3 migrated" in lines[older] and "ratio 3:1 for rate 4.2 req/s" in lines[older]


@pytest.mark.parametrize("make", [idle_snapshot, busy_snapshot, flip_snapshot, lost_snapshot])
def test_fits_80x24(make) -> None:
    out = text(make(), filled_history(), width=80, height=24)
    lines = out.splitlines()
    assert len(lines) <= 24
    assert all(len(line) <= 80 for line in lines)
    snap = make()
    for w in snap["workers"]:
        assert any(re.match(rf"\s*{w['id']}\s+{w['role']}\b", line) for line in lines), w["id"]
    assert "TTFT" in out and "TPOT" in out and "P/D" in out


def test_many_workers_keep_the_notable_ones() -> None:
    snap = lost_snapshot()
    snap["workers"] += [worker(i, "decode") for i in range(8, 16)]
    out = text(snap, width=80, height=24)
    lines = out.splitlines()
    assert len(lines) <= 24 and "more" in out
    assert "dead" in out


def test_missing_fields_and_unreachable() -> None:
    out = text({"workers": [{"id": 0}], "latency": None, "policy": {"forecast": None, "target": None}})
    assert re.search(r"│\s+0\s+\?", out)
    out = text(None, notice="cannot reach http://x: refused, retrying", width=80, height=24)
    assert "cannot reach http://x" in out and "waiting for the first snapshot" in out


def test_history_is_bounded_and_skips_repeats() -> None:
    history = History(max_samples=5)
    snap = busy_snapshot()
    for _ in range(3):
        history.add(snap)  # the same snapshot polled three times is one sample
    assert len(history) == 1
    for i in range(10):
        history.add(busy_snapshot(t=200.0 + i))
    assert len(history) == 5
    assert history.get("prefill")[-1] == 3 and history.get("decode")[-1] == 4
    assert history.get("forecast_rate")[-1] == 4.1
    assert sparkline([0.0, 0.5, 1.0, None], 10).plain == "▁▅█ "
    assert sparkline([], 10).plain == ""


async def test_run_monitor_survives_a_failing_frame(caplog) -> None:
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system=None)
    stop = asyncio.Event()
    calls = 0

    def get_snapshot() -> dict:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        if calls >= 5:
            stop.set()
        return copy.deepcopy(busy_snapshot(t=float(calls)))

    with caplog.at_level(logging.ERROR, logger="dopd.monitor"):
        await asyncio.wait_for(run_monitor(get_snapshot, stop, interval=0.01, console=console), 5)
    assert calls >= 5
    assert any("boom" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    assert "prefill" in console.file.getvalue()


async def test_run_monitor_cancelled() -> None:
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system=None)
    task = asyncio.create_task(run_monitor(idle_snapshot, asyncio.Event(), interval=0.01, console=console))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "serving" in console.file.getvalue()


async def test_watch_unreachable_keeps_retrying() -> None:
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system=None)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    await asyncio.wait_for(watch("http://127.0.0.1:9", interval=0.05, stop=stop, console=console), 10)
    assert "cannot reach http://127.0.0.1:9" in console.file.getvalue()



async def test_watch_a_hung_server_times_out_and_stops_at_once() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers: waits until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, stop.set)
    started = loop.time()
    try:
        await asyncio.wait_for(watch(f"http://127.0.0.1:{port}", interval=0.05, stop=stop, console=console,
                                     timeout=0.3), 5)
    finally:
        server.close()
    assert loop.time() - started < 1.5  # stopping does not wait for a hung poll
    assert "no answer in 0.3s, retrying" in console.file.getvalue()

@pytest.mark.slow
async def test_against_a_real_server() -> None:
    """The real snapshot renders at 80×24, a manual role change shows in the log, and `watch` polls it."""
    from serverproc import ServerProcess

    server = await asyncio.to_thread(ServerProcess, "--model", "tiny", "--gpus", "2", "--mode", "static")
    try:
        await asyncio.to_thread(server.post, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4})
        await asyncio.to_thread(server.post, "/v1/cluster/roles", {"roles": {"0": "mixed"}, "reason": "by the test"})
        for _ in range(100):
            snap = await asyncio.to_thread(server.get, "/v1/cluster")
            if snap["role_changes"]:
                break
            await asyncio.sleep(0.1)
        history = History()
        history.add(snap)
        out = text(snap, history, width=80, height=24)
        lines = out.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert re.search(r"^\s*0\s+mixed\b", out, re.M) and re.search(r"^\s*1\s+decode\b", out, re.M)
        assert "w0 prefill→mixed" in out and "by the test" in out
        console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system=None)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        await watch(server.url, interval=0.1, stop=stop, console=console)
        assert "0  mixed" in console.file.getvalue() and "cannot reach" not in console.file.getvalue()
    finally:
        await asyncio.to_thread(server.stop)
