"""scripts/bench.py and scripts/compare.py: timing against a fake SSE server, workloads, and live runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math

import msgspec
import numpy as np
import pytest
from aiohttp import web

from dopd.metrics import decode_records
from dopd.workload import WorkloadRequest
from scripts import bench, compare
from serverproc import ServerProcess

DELAYS = [0.15, 0.04, 0.04, 0.04, 0.04]  # before each of the K content chunks
K = len(DELAYS)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _completions(app: dict, request: web.Request) -> web.StreamResponse:
    """Behaviour picked by the body's model: ok, no-usage, error-mid, busy (429), bad (400), hang, wait."""
    body = await request.json()
    app["bodies"].append(body)
    kind = body["model"]
    if kind in ("busy", "bad"):
        status, message = (429, "server busy") if kind == "busy" else (400, "prompt is too long")
        return web.json_response({"error": {"message": message}}, status=status)
    if kind == "wait":  # for concurrency: hold every request until `expect` are in flight (or 3 s pass)
        app["in_flight"] += 1
        app["peak"] = max(app["peak"], app["in_flight"])
        if app["in_flight"] >= app["expect"]:
            app["all_in"].set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app["all_in"].wait(), 3.0)
        app["in_flight"] -= 1
        return web.json_response({"error": {"message": "done waiting"}}, status=503)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b": keep-alive comment\n\n")
    if kind == "hang":
        await asyncio.sleep(5)
    for k, delay in enumerate(DELAYS):
        await asyncio.sleep(delay)
        if kind == "error-mid" and k == 2:
            await resp.write(_sse({"error": {"message": "worker 1 was lost", "type": "server_error"}}))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        await resp.write(_sse({"id": "x", "choices": [{"index": 0, "text": f"t{k} t{k}", "finish_reason": None}]}))
    await resp.write(_sse({"id": "x", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
    if kind != "no-usage":  # the server coalesced two tokens per chunk
        await resp.write(_sse({"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2 * K}}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def fake():
    state = {"bodies": [], "in_flight": 0, "peak": 0, "expect": 0, "all_in": asyncio.Event()}
    app = web.Application()
    app.router.add_post("/v1/completions", functools.partial(_completions, state))
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "ok"}]}))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", state
    await runner.cleanup()


REQS = [WorkloadRequest(0.0, 7, 2 * K)]


async def test_timing_follows_vllm(fake):
    url, app = fake
    assert await bench.first_model(url) == "ok"
    (rec,), duration = await bench.run_workload(url, "ok", REQS)
    assert rec.success and rec.error == ""
    assert DELAYS[0] <= rec.ttft < DELAYS[0] + 0.25
    assert len(rec.itl) == K - 1 and all(gap >= 0.035 for gap in rec.itl)  # the empty final chunk is no gap
    assert rec.output_len == 2 * K  # from usage, not the chunk count
    assert rec.e2el >= sum(DELAYS) - 0.005 and duration >= rec.e2el
    assert rec.e2el >= rec.ttft + sum(rec.itl) - 1e-9
    body = app["bodies"][0]
    assert body["prompt"] == bench.token_prompt(REQS[0], 0) and len(body["prompt"]) == 7
    assert body["max_tokens"] == 2 * K and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


async def test_output_len_without_usage_counts_chunks(fake):
    (rec,), _ = await bench.run_workload(fake[0], "no-usage", REQS)
    assert rec.success and rec.output_len == K


@pytest.mark.parametrize(("model", "text"), [("error-mid", "worker 1 was lost"), ("busy", "HTTP 429"),
                                             ("bad", "prompt is too long")])
async def test_failures_are_records(fake, model, text):
    (rec,), _ = await bench.run_workload(fake[0], model, REQS)
    assert not rec.success and text in rec.error


async def test_timeout_and_connection_failure(fake):
    (rec,), _ = await bench.run_workload(fake[0], "hang", REQS, request_timeout=0.3)
    assert not rec.success and "timeout" in rec.error
    (rec,), _ = await bench.run_workload("http://127.0.0.1:9", "ok", REQS)  # nothing listens on port 9
    assert not rec.success and rec.error


async def test_concurrency_is_not_capped_by_the_connector(fake):
    url, app = fake
    many = [WorkloadRequest(0.0, 4, 1)] * 150  # more than aiohttp's default limit of 100 connections
    app["expect"] = 150
    records, duration = await bench.run_workload(url, "wait", many)
    assert len(records) == 150 and app["peak"] == 150 and duration < 3.0
    app.update(peak=0, expect=10, all_in=asyncio.Event())
    await bench.run_workload(url, "wait", many[:30], max_concurrency=10)
    assert app["peak"] == 10


# ---- workloads ------------------------------------------------------------------------------------

def _build(*argv: str) -> list[tuple[float, list[WorkloadRequest]]]:
    args = bench.parser().parse_args(list(argv))
    return bench.build_sweep(args, bench.build_requests(args))


def test_fixed_rate_gamma_arrivals_and_exact_lengths():
    ((rate, reqs),) = _build("--request-rate", "10", "--num-requests", "2000", "--input-len", "100",
                             "--output-len", "20")
    assert rate == 10 and len(reqs) == 2000
    assert {(r.input_len, r.output_len) for r in reqs} == {(100, 20)}
    gaps = np.diff([r.arrival_time for r in reqs])
    assert reqs[0].arrival_time == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(1, abs=0.1)
    ((_, bursty),) = _build("--request-rate", "10", "--burstiness", "0.25", "--num-requests", "2000")
    bgaps = np.diff([r.arrival_time for r in bursty])
    assert bgaps.std() / bgaps.mean() == pytest.approx(2, abs=0.3)  # CV = 1/sqrt(b)
    assert _build("--request-rate", "10", "--num-requests", "50")[0][1] == _build(
        "--request-rate", "10", "--num-requests", "50")[0][1]
    ((rate, burst),) = _build("--num-requests", "5")  # inf: all at once
    assert math.isinf(rate) and all(r.arrival_time == 0 for r in burst)


def test_token_prompts_are_exact_deterministic_and_in_band():
    req = WorkloadRequest(0.0, 1234, 5)
    ids = bench.token_prompt(req, 3, seed=1, band=(300, 2300))
    assert len(ids) == 1234 and min(ids) >= 300 and max(ids) < 2300
    assert ids == bench.token_prompt(req, 3, seed=1, band=(300, 2300))
    assert ids != bench.token_prompt(req, 4, seed=1, band=(300, 2300))
    a = bench.token_prompt(WorkloadRequest(0.0, 1100, 5, hash_ids=[7, 8, 9]), 0)
    b = bench.token_prompt(WorkloadRequest(0.0, 700, 5, hash_ids=[7, 10]), 1)
    assert a[:512] == b[:512] and a[512:700] != b[512:700] and len(a) == 1100 and len(b) == 700


def test_rate_sweep_scales_the_same_shapes():
    runs = _build("--request-rate", "3", "--num-requests", "40", "--input-len", "azure-conv",
                  "--output-len", "azure-conv", "--rates", "2,8")
    (r2, slow), (r8, fast) = runs
    assert (r2, r8) == (2, 8)
    assert [(r.input_len, r.output_len) for r in slow] == [(r.input_len, r.output_len) for r in fast]
    assert len({r.input_len for r in slow}) > 1
    np.testing.assert_allclose([r.arrival_time for r in slow], [4 * r.arrival_time for r in fast])
    assert len(slow) / (slow[-1].arrival_time + 1e-9) == pytest.approx(2, rel=0.4)
    spec = _build("--synthetic", "poisson:rate=4,n=60,in=azure-code,out=azure-code", "--num-requests", "30",
                  "--max-input-len", "500", "--rates", "1,4")
    assert all(len(reqs) == 30 and max(r.input_len for r in reqs) <= 500 for _, reqs in spec)
    assert bench.mean_rate(spec[1][1]) == pytest.approx(4)


def test_sweep_report_goodput_and_slo_scales():
    from dopd.metrics import SLO, RequestRecord

    def recs(ttft: float) -> list[RequestRecord]:
        return [RequestRecord(request_id=str(i), arrival_time=0.0, input_len=10, output_len=11, ttft=ttft,
                              itl=[], e2el=ttft + 0.1, success=True) for i in range(10)]

    runs = [(2.0, recs(0.1), 5.0), (4.0, recs(0.1), 5.0), (8.0, recs(1.0), 5.0)]
    report = bench.sweep_report(runs, SLO(0.5, 0.05), num_gpus=2, slo_scales=[2.0, 1.0])
    assert [r["rate_per_gpu"] for r in report["runs"]] == [1.0, 2.0, 4.0]
    assert report["distserve_goodput_per_gpu"] == pytest.approx(2.0 + 0.1 / 1.0 * 2.0)
    assert report["slo_scale_curve"] == [(2.0, 1.0), (1.0, 0.0)] and report["min_slo_scale"] == 2.0
    assert "DistServe goodput" in bench.format_report(report)
    assert "Infinity" not in bench.to_json({"x": math.inf})


# ---- against the real server ----------------------------------------------------------------------

def test_end_to_end_against_the_mock_server():
    server = ServerProcess("--model", "tiny", "--engine", "mock", "--gpus", "2", "--mode", "static", "--pd-ratio",
                           "1:1", "--model-profile", "llama3-8b")
    try:
        ((rate, reqs),) = _build("--request-rate", "20", "--num-requests", "20", "--input-len", "100",
                                 "--output-len", "20")
        records, duration = asyncio.run(bench.run_workload(server.url, "tiny", reqs))
        assert all(r.success for r in records), [r.error for r in records if not r.success]
        assert all(r.output_len == 20 and r.ttft > 0 and r.e2el > r.ttft for r in records)
        summary = bench.sweep_report([(rate, records, duration)], bench.SLO(1.5, 0.05), 2)["runs"][0]["summary"]
        for key in ("ttft_p99", "tpot_median", "itl_p90", "e2el_mean", "slo_attainment", "goodput_rps_per_gpu"):
            assert summary[key] is not None
        assert summary["num_completed"] == 20 and summary["total_output_tokens"] == 400
    finally:
        assert server.stop() == 0, server.logs()


@pytest.mark.slow
def test_compare_live_writes_results_and_plots(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main([
        "--live", "--server-args", "--model tiny --engine mock --model-profile llama3-8b",
        "--system", "colocated=--mode colocated --gpus 2", "--system", "static=--mode static --pd-ratio 1:1 --gpus 2",
        "--request-rate", "10", "--num-requests", "10", "--input-len", "64", "--output-len", "8", "--rates", "10,30",
        "--slo-ttft", "1", "--slo-tpot", "0.1", "--out", str(out), "--quiet", "--poll-interval", "0.2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"colocated", "static"}
    static = results["systems"]["static"]
    assert static["num_gpus"] == 2 and [r["rate"] for r in static["runs"]] == [10, 30]
    assert static["runs"][-1]["split"][-1]["roles"] == {"prefill": 1, "decode": 1}
    assert results["systems"]["colocated"]["runs"][0]["split"][0]["roles"] == {"mixed": 2}
    records = decode_records((out / static["runs"][0]["records"]).read_bytes())
    assert len(records) == 10 and all(r.success for r in records)
    assert "| static |" in (out / "results.md").read_text()
    for png in ("attainment_vs_rate.png", "latency_cdf.png", "pd_split.png"):
        assert (out / png).stat().st_size > 1000


def test_compare_helpers():
    assert compare.parse_system("a=--mode static --gpus 4") == ("a", ["--mode", "static", "--gpus", "4"])
    assert compare.gpus_of(["--gpus", "2", "--gpus=8"]) == 8 and compare.gpus_of([], 3) == 3
    snap = {"workers": [{"role": "prefill", "target_role": "decode"}, {"role": "decode", "target_role": None}],
            "num_requests": 3}
    assert compare.split_point(snap, 1.0) == {"t": 1.0, "roles": {"prefill": 1, "decode": 1}, "moving": 1,
                                              "num_requests": 3}
    assert msgspec.json.decode(bench.request_body("m", [1, 2], 3, {"top_k": 1}))["top_k"] == 1
