#!/usr/bin/env python
"""Load generator: replay a workload against any OpenAI-compatible server (ours, vLLM, SGLang).

    python scripts/bench.py --synthetic "poisson:rate=4,n=200,in=azure-conv,out=azure-conv" --slo-ttft 1.5 \\
        --slo-tpot 0.05
    python scripts/bench.py --request-rate 8 --burstiness 0.5 --num-requests 200 --input-len 512 --output-len 64
    python scripts/bench.py --trace conv.csv --duration 120 --rates 1,2,4 --num-gpus 2 --slo-scales

Timing is `vllm bench serve`'s (reference/workloads.md §5.1): TTFT = send → the first streamed chunk
with text; E2EL = send → the last byte; ITL = the gap before every later content chunk (per chunk,
as vLLM records it, even where the server coalesced tokens); output_len = the usage chunk's
completion_tokens, else the number of content chunks.

Prompts are token ids (`"prompt": [ids]`, which our and vLLM's /v1/completions accept) so that each
has exactly the workload's length, drawn from `--token-band LO:HI`: the server's vocabulary must
cover it (the tiny model's 4096 ids and any real LLM's do). Ids are a pure function of (seed, request
index), or of (seed, block hash) for Mooncake's prefix blocks, so that a shared prefix in the trace
is a shared prefix on the wire. `--text-prompts DIR` sends text of the same lengths instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

from dopd.metrics import (DEFAULT_SLO_SCALES, SLO, RequestRecord, encode_records, format_table,  # noqa: E402
                          interpolate_goodput, min_slo_scale, slo_scale_curve, summarize)
from dopd.workload import (MOONCAKE_BLOCK_SIZE, WorkloadRequest, arrivals, describe, load_trace,  # noqa: E402
                           sample_lengths, scale_rate, shape, synthetic)

DEFAULT_BAND = (300, 2300)
Prompt = list[int] | str
PromptMaker = Callable[[WorkloadRequest, int], Prompt]


# ---- prompts ------------------------------------------------------------------------------------

def token_prompt(req: WorkloadRequest, index: int, seed: int = 0, band: tuple[int, int] = DEFAULT_BAND) -> list[int]:
    """`req.input_len` ids in [lo, hi); per prefix block when the trace has hash_ids, else per request."""
    lo, hi = band
    ids = np.empty(0, dtype=np.int64)
    if req.hash_ids:
        ids = np.concatenate([np.random.default_rng([seed, 1, h]).integers(lo, hi, MOONCAKE_BLOCK_SIZE)
                              for h in req.hash_ids])[:req.input_len]
    rest = np.random.default_rng([seed, 0, index]).integers(lo, hi, req.input_len - len(ids))
    return np.concatenate([ids, rest]).tolist()


def text_prompts(tokenizer_dir: str, seed: int = 0, band: tuple[int, int] = DEFAULT_BAND) -> PromptMaker:
    """A prompt maker for text: the trace's own text if it has some, else token ids decoded to text
    and re-encoded until the length holds (decode∘encode is not the identity for BPE)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(req: WorkloadRequest, index: int) -> str:
        if req.prompt is not None:
            return req.prompt
        ids = token_prompt(req, index, seed, band)
        text = tokenizer.decode(ids)
        for _ in range(4):
            got = tokenizer.encode(text, add_special_tokens=False)
            if len(got) == req.input_len:
                break
            got = got[:req.input_len] if len(got) > req.input_len else got + ids[:req.input_len - len(got)]
            text = tokenizer.decode(got)
        return text

    return make


def request_body(model: str, prompt: Prompt, output_len: int, extra: dict | None = None) -> bytes:
    """Forced-length, greedy, streamed completion request (ignore_eos + max_tokens, as DistServe/vLLM)."""
    return msgspec.json.encode({"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                                **(extra or {})})


# ---- one request ----------------------------------------------------------------------------------

class _Choice(msgspec.Struct):
    text: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    """Only the fields timing needs: msgspec skips the rest of each event without building it."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: dict | str | None = None


_DECODER = msgspec.json.Decoder(_Chunk)


async def send_one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                   req: WorkloadRequest, request_id: str, t0: float) -> RequestRecord:
    """Send one streamed request and time it; every failure becomes a record with success=False."""
    ttft: float | None = None
    itl: list[float] = []
    num_chunks, usage_len, error, done = 0, None, "", False
    start = last = end = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
            else:
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments / keep-alives
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = _DECODER.decode(payload)
                    if chunk.error is not None:
                        error = chunk.error if isinstance(chunk.error, str) else str(
                            chunk.error.get("message") or chunk.error)
                        break
                    if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                        usage_len = chunk.usage.completion_tokens
                    if chunk.choices and any(c.text for c in chunk.choices):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - start
                        else:
                            itl.append(now - last)
                        last = now
                        num_chunks += 1
            end = time.perf_counter()
    except TimeoutError:
        end, error = time.perf_counter(), f"timeout after {time.perf_counter() - start:.1f} s"
    except (aiohttp.ClientError, msgspec.DecodeError, ValueError, OSError) as e:
        end, error = time.perf_counter(), f"{type(e).__name__}: {e}"
    if not error and not done:
        error = "stream ended before [DONE]"
    if not error and ttft is None:
        error = "no chunk with text was received"
    return RequestRecord(request_id=request_id, arrival_time=start - t0, input_len=req.input_len,
                         output_len=usage_len if usage_len is not None else num_chunks, ttft=ttft, itl=itl,
                         e2el=end - start, success=not error, error=error)


# ---- a workload -----------------------------------------------------------------------------------

async def run_workload(url: str, model: str, requests: Sequence[WorkloadRequest], *, api_key: str | None = None,
                       prompts: PromptMaker | None = None, max_concurrency: int | None = None,
                       extra_body: dict | None = None, request_timeout: float = 3600.0,
                       on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send each request at its arrival time (s after the first); return the records and the wall duration.

    Bodies are encoded before the clock starts so that building a 100k-token prompt never delays a
    send. The connector has no connection cap of its own: only `max_concurrency` limits in-flight
    requests, as in vLLM (where a request waits for the semaphore, its send time is when it gets it).
    """
    make = prompts or (lambda req, i: token_prompt(req, i))
    bodies = [request_body(model, make(r, i), r.output_len, extra_body) for i, r in enumerate(requests)]
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    endpoint = url.rstrip("/") + "/v1/completions"
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)) as s:
        t0 = time.perf_counter()
        base = requests[0].arrival_time if requests else 0.0

        async def one(i: int, req: WorkloadRequest) -> RequestRecord:
            async with limit if limit is not None else contextlib.nullcontext():
                record = await send_one(s, endpoint, bodies[i], headers, req, str(i), t0)
            if on_done is not None:
                on_done(record)
            return record

        tasks = []
        for i, req in enumerate(requests):
            delay = t0 + (req.arrival_time - base) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, req)))
        records = list(await asyncio.gather(*tasks))
        return records, time.perf_counter() - t0


async def first_model(url: str, api_key: str | None = None) -> str:
    """The id of the first model the server lists (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as s, s.get(url.rstrip("/") + "/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


@contextlib.asynccontextmanager
async def progress_bar(total: int, label: str = "requests", quiet: bool = False
                       ) -> AsyncIterator[Callable[[RequestRecord], None] | None]:
    """A rich bar on stderr (done / total, failures), redrawn from an asyncio task, not a thread."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
                   console=Console(stderr=True), auto_refresh=False)
    task = bar.add_task(label, total=total, failed=0)
    failed = 0

    def done(record: RequestRecord) -> None:
        nonlocal failed
        failed += not record.success
        bar.update(task, advance=1, failed=failed)

    async def redraw() -> None:
        while True:
            bar.refresh()
            await asyncio.sleep(0.25)

    with bar:
        painter = asyncio.create_task(redraw())
        try:
            yield done
        finally:
            painter.cancel()
            bar.refresh()


# ---- building workloads ---------------------------------------------------------------------------

def _band(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    if not hi or not 0 <= int(lo) < int(hi):
        raise argparse.ArgumentTypeError("expected LO:HI with 0 <= LO < HI")
    return int(lo), int(hi)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_requests(args: argparse.Namespace) -> list[WorkloadRequest]:
    """The base workload. In fixed-rate mode with --rates it is generated at 1 req/s (then scaled)."""
    if args.trace:
        reqs = load_trace(args.trace)
    elif args.synthetic:
        reqs = synthetic(args.synthetic, seed=args.seed)
    else:
        rng = np.random.default_rng(args.seed)
        n = args.num_requests or 100
        times = arrivals(1.0 if args.rates else args.request_rate, n=n, burstiness=args.burstiness, rng=rng)
        num_in = sample_lengths(args.input_len, n, rng, output=False)
        num_out = sample_lengths(args.output_len, n, rng, output=True)
        reqs = [WorkloadRequest(float(t), int(i), int(o)) for t, i, o in zip(times, num_in, num_out)]
    return shape(reqs, args.rate_scale, args.num_requests, args.duration, args.max_input_len, args.max_output_len)


def mean_rate(reqs: Sequence[WorkloadRequest]) -> float:
    """Requests per second over the gaps between arrivals (inf when all arrive at once)."""
    span = reqs[-1].arrival_time - reqs[0].arrival_time if len(reqs) > 1 else 0.0
    return (len(reqs) - 1) / span if span > 0 else math.inf


def build_sweep(args: argparse.Namespace, base: list[WorkloadRequest]) -> list[tuple[float, list[WorkloadRequest]]]:
    """(total rate, workload) per run: the base alone, or the same shapes scaled in time to each of --rates.

    A base whose requests all arrive at once (rate inf, or ShareGPT without timestamps) gets Gamma
    arrivals at each rate instead (--burstiness), since it has no time to scale.
    """
    fixed_rate = not (args.trace or args.synthetic)
    nominal = (1.0 if args.rates else args.request_rate) if fixed_rate else mean_rate(base)  # as built
    if not args.rates:
        return [(nominal, base)]
    runs = []
    for rate in args.rates:
        if math.isinf(nominal):
            times = arrivals(rate, n=len(base), burstiness=args.burstiness, rng=np.random.default_rng(args.seed))
            runs.append((rate, [msgspec.structs.replace(r, arrival_time=float(t)) for r, t in zip(base, times)]))
        else:
            runs.append((rate, scale_rate(base, rate / nominal)))
    return runs


def prompt_maker(args: argparse.Namespace) -> PromptMaker:
    if args.text_prompts:
        return text_prompts(args.text_prompts, args.seed, args.token_band)
    return lambda req, i: token_prompt(req, i, args.seed, args.token_band)


def slo_of(args: argparse.Namespace) -> SLO | None:
    if args.slo_ttft is None and args.slo_tpot is None:
        return None
    return SLO(args.slo_ttft if args.slo_ttft is not None else math.inf,
               args.slo_tpot if args.slo_tpot is not None else math.inf)


# ---- reporting ------------------------------------------------------------------------------------

def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(obj) -> str:
    """Indented JSON; msgspec writes inf/nan as null (an SLO on one target only is inf on the other)."""
    return msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n"


def sweep_report(runs: Sequence[tuple[float, list[RequestRecord], float]], slo: SLO | None, num_gpus: int = 1,
                 slo_scales: Sequence[float] | None = None) -> dict:
    """Summaries of (rate, records, duration) runs; DistServe per-GPU goodput over a sweep; SLO-scale curve."""
    out: dict = {"num_gpus": num_gpus, "runs": [
        {"rate": _finite(rate), "rate_per_gpu": _finite(rate / num_gpus),
         "summary": summarize(recs, dur, slo, num_gpus)} for rate, recs, dur in runs]}
    if slo is not None and len(runs) > 1:
        out["distserve_goodput_per_gpu"] = interpolate_goodput(
            [r["rate_per_gpu"] or 0.0 for r in out["runs"]], [r["summary"]["slo_attainment"] for r in out["runs"]])
    if slo is not None and slo_scales and runs:
        out["slo_scale_curve"] = slo_scale_curve(runs[-1][1], slo, slo_scales)
        out["min_slo_scale"] = min_slo_scale(runs[-1][1], slo, scales=slo_scales)
    return out


def format_report(report: dict) -> str:
    """format_table per run, then the sweep's attainment table, goodput and SLO-scale curve."""
    parts = []
    for run in report["runs"]:
        parts += [f"## rate {run['rate'] or math.inf:g} req/s", "", format_table(run["summary"]), ""]
    if "distserve_goodput_per_gpu" in report:
        parts += ["| rate (req/s) | per GPU | attainment | goodput (req/s) | TTFT p90 (ms) | TPOT p90 (ms) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for run in report["runs"]:
            s = run["summary"]
            ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
            parts.append(f"| {run['rate']:.3g} | {run['rate_per_gpu']:.3g} | {s['slo_attainment'] * 100:.1f} % | "
                         f"{s['goodput_rps']:.3f} | {ms(s['ttft_p90'])} | {ms(s['tpot_p90'])} |")
        parts += ["", f"DistServe goodput (90 % joint attainment): {report['distserve_goodput_per_gpu']:.3f} "
                      f"req/s per GPU ({report['num_gpus']} GPUs)", ""]
    if "slo_scale_curve" in report:
        parts += ["| SLO scale | attainment |", "| --- | --- |",
                  *(f"| {scale:g} | {value * 100:.1f} % |" for scale, value in report["slo_scale_curve"]),
                  "", f"smallest scale with ≥ 90 %: {report['min_slo_scale']}"]
    return "\n".join(parts).rstrip() + "\n"


def records_path(path: Path, rate: float, sweep: bool) -> Path:
    """FILE for one run; FILE's stem + `.r<rate>` for each run of a sweep."""
    return path.with_name(f"{path.stem}.r{rate:g}{path.suffix}") if sweep else path


# ---- CLI ------------------------------------------------------------------------------------------

def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload, prompt, SLO and pacing flags shared by bench.py and compare.py."""
    g = parser.add_argument_group("workload")
    g.add_argument("--trace", help="Azure CSV, Mooncake JSONL, BurstGPT CSV or ShareGPT JSON")
    g.add_argument("--synthetic", metavar="SPEC", help='dopd.workload.synthetic spec, e.g. '
                   '"poisson:rate=4,n=200,in=azure-conv,out=azure-conv" (phases joined by ;)')
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="fixed-rate mode: req/s (default inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 Poisson, <1 burstier, inf constant")
    g.add_argument("--input-len", default="1024", help="fixed-rate mode: tokens, or a distribution (azure-conv, ...)")
    g.add_argument("--output-len", default="128", help="fixed-rate mode: tokens, or a distribution")
    g.add_argument("--num-requests", type=int, help="the first N requests (fixed-rate mode: N, default 100)")
    g.add_argument("--duration", type=float, help="only requests arriving in the first S seconds")
    g.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace/synthetic rate")
    g.add_argument("--rates", type=_floats, help="rate sweep R1,R2,...: one run per total rate (req/s), same shapes")
    g.add_argument("--max-input-len", type=int, help="clamp prompt lengths")
    g.add_argument("--max-output-len", type=int, help="clamp output lengths")
    g.add_argument("--seed", type=int, default=0, help="arrivals, lengths and prompt tokens (default 0)")
    g.add_argument("--token-band", type=_band, default=DEFAULT_BAND, help="token ids to draw prompts from, LO:HI "
                   "(default 300:2300; the server's vocabulary must cover it)")
    g.add_argument("--text-prompts", metavar="TOKENIZER_DIR", help="send text built with this tokenizer instead of ids")
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="per-request timeout, s (default 3600)")
    g.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")
    m = parser.add_argument_group("metrics")
    m.add_argument("--slo-ttft", type=float, help="TTFT SLO, seconds")
    m.add_argument("--slo-tpot", type=float, help="TPOT SLO, seconds")
    m.add_argument("--slo-scales", nargs="?", const=DEFAULT_SLO_SCALES, type=_floats,
                   help="SLO-scale curve of the last run: S1,S2,... (no value: 1.6 … 0.4)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark an OpenAI-compatible server (vllm bench serve timing).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs of the served system, for per-GPU rates and goodput")
    p.add_argument("--records", type=Path, help="per-request records, JSON Lines (a sweep: one file per rate)")
    p.add_argument("--json", type=Path, help="summary JSON")
    add_workload_arguments(p)
    return p


async def _bench(args: argparse.Namespace) -> dict:
    model = args.model or await first_model(args.url, args.api_key)
    base = build_requests(args)
    sweep = build_sweep(args, base)
    prompts = prompt_maker(args)
    runs = []
    for rate, reqs in sweep:
        async with progress_bar(len(reqs), f"rate {rate:g}", args.quiet) as done:
            records, duration = await run_workload(args.url, model, reqs, api_key=args.api_key, prompts=prompts,
                                                   max_concurrency=args.max_concurrency, extra_body=args.extra_body,
                                                   request_timeout=args.request_timeout, on_done=done)
        if args.records:
            records_path(args.records, rate, len(sweep) > 1).write_bytes(encode_records(records))
        runs.append((rate, records, duration))
    report = sweep_report(runs, slo_of(args), args.num_gpus, args.slo_scales)
    if args.records:
        for run, (rate, _, _) in zip(report["runs"], runs):
            run["records"] = str(records_path(args.records, rate, len(sweep) > 1))
    return {"url": args.url, "model": model, "workload": describe(base)} | report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with contextlib.suppress(ValueError, OSError):  # thousands of concurrent streams need as many sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    report = asyncio.run(_bench(args))
    if args.json:
        args.json.write_text(to_json(report))
    print(format_report(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
