#!/usr/bin/env python
"""Compare serving systems on one workload: start each, replay the same requests, tabulate and plot.

    python scripts/compare.py --live --server-args "--model tiny --engine mock --model-profile llama3-8b" \\
        --system "colocated=--mode colocated --gpus 2" --system "static=--mode static --pd-ratio 1:1 --gpus 2" \\
        --synthetic "poisson:rate=4,n=200,in=azure-conv,out=azure-conv" --slo-ttft 1.5 --slo-tpot 0.05 --out runs/cmp

Live mode starts `python dopd.py <server-args> <system args> --port 0 --no-monitor` per system, one
at a time (so systems never share the CPU), runs every rate of the sweep through bench.py's
`run_workload` while polling GET /v1/cluster each second for the P/D split and the load, and stops
the server — also on error or Ctrl-C. Rates of a sweep run back to back on one server, so a
controller that moved workers at one rate starts the next from there, as it would in production.
Simulated mode hands the same requests to dopd.sim.simulator.simulate instead, with the cost model,
worker count, policy and start split that the same server flags would give the mock engine.

--out DIR receives results.json, results.md, <system>.r<rate>.jsonl records, server logs and PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

from scripts import bench  # noqa: E402
from scripts import plot  # noqa: E402
from dopd.metrics import SLO, RequestRecord, encode_records  # noqa: E402
from dopd.workload import WorkloadRequest, describe  # noqa: E402

DOPD = Path(__file__).resolve().parents[1] / "dopd.py"
Run = tuple[float, list[RequestRecord], float, list[dict]]  # rate, records, duration, split series


def parse_system(text: str) -> tuple[str, list[str]]:
    name, sep, argv = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS with a file-name-safe NAME, got {text!r}")
    return name.strip(), shlex.split(argv)


def gpus_of(argv: Sequence[str], default: int = 1) -> int:
    """The last `--gpus N` (or `--gpus=N`) of a server command line: later flags win in argparse too."""
    gpus = default
    for i, arg in enumerate(argv):
        if arg == "--gpus" and i + 1 < len(argv):
            gpus = int(argv[i + 1])
        elif arg.startswith("--gpus="):
            gpus = int(arg.split("=", 1)[1])
    return gpus


# ---- live -----------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def launched(argv: list[str], log_path: Path, timeout: float = 300.0) -> AsyncIterator[str]:
    """Run `python dopd.py argv --port 0 --no-monitor`; yield its URL; always SIGTERM and reap it."""
    log = open(log_path, "wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(DOPD), *argv, "--port", "0", "--no-monitor",
                                                stdout=asyncio.subprocess.PIPE, stderr=log)
    drain = None
    try:
        url = await asyncio.wait_for(_serving_url(proc, log), timeout)
        # keep reading stdout, or a chatty server would block on a full pipe
        drain = asyncio.create_task(_copy(proc.stdout, log))
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
        log.close()


async def _serving_url(proc: asyncio.subprocess.Process, log) -> str:
    while line := await proc.stdout.readline():
        log.write(line)
        text = line.decode(errors="replace")
        if text.startswith("DOPD serving ") and (m := re.search(r" at (http://\S+)", text)):
            return m.group(1).replace("//0.0.0.0:", "//127.0.0.1:")
    raise RuntimeError(f"server exited (code {await proc.wait()}) before serving; see {log.name}")


async def _copy(stream: asyncio.StreamReader, log) -> None:
    while line := await stream.readline():
        log.write(line)


def split_point(snapshot: dict, t: float) -> dict:
    """One sample of the P/D split and the load, from a /v1/cluster snapshot."""
    workers = snapshot.get("workers", [])
    return {"t": t, "roles": dict(Counter(w["role"] for w in workers)),
            "moving": sum(w.get("target_role") is not None for w in workers),
            "num_requests": snapshot.get("num_requests", 0)}


async def poll_cluster(url: str, series: list[dict], t0: float, stop: asyncio.Event, interval: float = 1.0) -> None:
    """Append a split sample every `interval` s, and a last one once `stop` is set; a failed poll is skipped."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(url + "/v1/cluster") as resp:
                    series.append(split_point(await resp.json(), time.perf_counter() - t0))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def run_live(name: str, argv: list[str], sweep: list[tuple[float, list[WorkloadRequest]]],
                   args: argparse.Namespace, out: Path) -> list[Run]:
    """Every rate of the sweep against one freshly started server for this system."""
    runs: list[Run] = []
    async with launched(argv, out / f"{name}.server.log", args.startup_timeout) as url:
        model = await bench.first_model(url)
        prompts = bench.prompt_maker(args)
        for rate, reqs in sweep:
            series: list[dict] = []
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_cluster(url, series, time.perf_counter(), stop, args.poll_interval))
            try:
                async with bench.progress_bar(len(reqs), f"{name} @ {rate:g} req/s", args.quiet) as done:
                    records, duration = await bench.run_workload(
                        url, model, reqs, prompts=prompts, max_concurrency=args.max_concurrency,
                        extra_body=args.extra_body, request_timeout=args.request_timeout, on_done=done)
                stop.set()
                await poller  # one last sample: the split the run ended with
            finally:
                poller.cancel()
            runs.append((rate, records, duration, series))
    return runs


# ---- simulated ------------------------------------------------------------------------------------

def simulator_inputs(argv: Sequence[str], slo: SLO | None = None) -> dict:
    """A system's server flags → simulate()'s arguments, parsed by dopd.config exactly as dopd.py parses them."""
    import dataclasses

    from dopd.config import DopdConfig, add_arguments, from_args
    from dopd.sim.simulator import sim_config

    flags = argparse.ArgumentParser(prog="dopd.py")
    add_arguments(flags, DopdConfig)
    flags.add_argument("--log-level")
    cfg = from_args(DopdConfig, {k: v for k, v in vars(flags.parse_args(list(argv))).items() if k != "log_level"})
    sim = sim_config(cfg)
    if slo is not None:
        sim = dataclasses.replace(sim, slo=slo)
    return {f.name: getattr(sim, f.name) for f in dataclasses.fields(sim)}


def run_simulated(argv: list[str], sweep: list[tuple[float, list[WorkloadRequest]]], slo: SLO | None) -> list[Run]:
    """Thin adapter over dopd.sim.simulator.simulate; its timeline becomes split samples."""
    from dopd.sim.simulator import simulate  # written separately; only this mode needs it

    kwargs = simulator_inputs(argv, slo)
    runs: list[Run] = []
    for rate, reqs in sweep:
        result = simulate(list(reqs), **kwargs)
        series = [{"t": p["time"], "roles": {r: p[r] for r in plot.ROLE_COLORS if p.get(r)}, "moving": 0,
                   "num_requests": None, "rate": p.get("rate")} for p in result.timeline]
        runs.append((rate, result.records, result.summary["duration_s"], series))
    return runs


# ---- results --------------------------------------------------------------------------------------

def system_result(name: str, argv: list[str], runs: list[Run], args: argparse.Namespace, out: Path) -> dict:
    """bench.sweep_report for one system, plus its command line, record files and split series."""
    num_gpus = gpus_of(argv, args.num_gpus)
    report = bench.sweep_report([(rate, recs, dur) for rate, recs, dur, _ in runs], bench.slo_of(args), num_gpus,
                                args.slo_scales)
    for entry, (rate, records, _, series) in zip(report["runs"], runs):
        path = out / f"{name}.r{rate:g}.jsonl"
        path.write_bytes(encode_records(records))
        entry |= {"records": path.name, "split": series}
    return {"argv": argv} | report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    """One row per system and rate; a DistServe goodput table when a sweep was run."""
    lines = ["| system | rate (req/s) | goodput (req/s) | per-GPU goodput | attainment | TTFT p50 / p90 / p99 (ms) "
             "| TPOT p50 / p90 / p99 (ms) | throughput (req/s) | failures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, system in results["systems"].items():
        for run in system["runs"]:
            s = run["summary"]
            attained = "-" if s["slo_attainment"] is None else f"{s['slo_attainment'] * 100:.1f} %"
            ttft = " / ".join(_ms(s[f"ttft_{k}"]) for k in ("median", "p90", "p99"))
            tpot = " / ".join(_ms(s[f"tpot_{k}"]) for k in ("median", "p90", "p99"))
            lines.append(f"| {name} | {_num(run['rate'], 2)} | {_num(s['goodput_rps'])} | "
                         f"{_num(s['goodput_rps_per_gpu'])} | {attained} | {ttft} | {tpot} | "
                         f"{_num(s['request_throughput_rps'])} | {s['num_failed']} |")
    if any("distserve_goodput_per_gpu" in s or "min_slo_scale" in s for s in results["systems"].values()):
        lines += ["", "| system | GPUs | DistServe goodput per GPU (req/s, 90 %) | smallest SLO scale ≥ 90 % |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {s['num_gpus']} | {_num(s.get('distserve_goodput_per_gpu'))} | "
                  f"{_num(s.get('min_slo_scale'), 2)} |" for name, s in results["systems"].items()]
    return "\n".join(lines) + "\n"


async def compare(args: argparse.Namespace) -> dict:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = bench.build_requests(args)
    sweep = bench.build_sweep(args, base)
    slo = bench.slo_of(args)
    results: dict = {"workload": describe(base), "slo": None if slo is None else {"ttft": slo.ttft, "tpot": slo.tpot},
                     "mode": "live" if args.live else "simulate", "systems": {}}
    common = shlex.split(args.server_args)
    for name, argv in args.system:
        full = common + argv
        runs = await run_live(name, full, sweep, args, out) if args.live else run_simulated(full, sweep, slo)
        results["systems"][name] = system_result(name, full, runs, args, out)
    (out / "results.json").write_text(bench.to_json(results))
    (out / "results.md").write_text(markdown(results))
    results["plots"] = [str(p) for p in plot.plot_all(results, out)]
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run several systems on the same workload; write tables and plots.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--live", action="store_true", help="start each system as a real dopd.py server")
    mode.add_argument("--simulate", action="store_true", help="use dopd.sim.simulator.simulate instead")
    p.add_argument("--system", type=parse_system, action="append", required=True, metavar="NAME=ARGS",
                   help='a system and its server flags, e.g. "static=--mode static --pd-ratio 1:1 --gpus 2" (repeat)')
    p.add_argument("--server-args", default="", help="flags common to every system, before each system's own")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs of a system whose flags have no --gpus")
    p.add_argument("--out", type=Path, required=True, help="directory for results, records, logs and plots")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /v1/cluster polls")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each server")
    bench.add_workload_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if len({name for name, _ in args.system}) != len(args.system):
        parser().error("system names must be distinct")
    try:
        results = asyncio.run(compare(args))
    except ImportError as e:  # --simulate before dopd.sim.simulator exists
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    print("\n".join(f"wrote {p}" for p in [args.out / "results.json", args.out / "results.md", *results["plots"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
