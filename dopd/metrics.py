"""Per-request records → serving metrics: TTFT/TPOT/ITL/E2EL, SLO attainment, goodput.

One record schema (`RequestRecord`) is written by both the live HTTP benchmark and the
virtual-clock simulator, so every number below is computed the same way for both. The
conventions follow `vllm bench serve` and DistServe (see reference/workloads.md §5):

- TPOT = (E2EL − TTFT) / (output_len − 1): it excludes the first token. A 1-token request has
  no TPOT in the latency statistics but counts TPOT = 0 when judged against an SLO.
- ITL is every inter-token gap of every request pooled into one list (per-gap, not per-request).
- A request is *good* when it succeeded and meets every SLO; failed requests are never good but
  stay in the attainment denominator. vLLM goodput = good requests / duration; DistServe goodput
  = the highest per-GPU rate whose joint attainment is ≥ 90 % (`distserve_goodput`).

All times are seconds. Pure: no I/O, no torch.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

PERCENTILES = (50, 90, 99)
DEFAULT_SLO_SCALES = (1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


class RequestRecord(msgspec.Struct, kw_only=True):
    """What one benchmark or simulated request produced; written as one JSON line."""

    request_id: str
    arrival_time: float  # s since benchmark start: when the request was sent
    input_len: int
    output_len: int  # tokens generated
    ttft: float | None  # s, send → first token
    itl: list[float]  # every inter-token gap (s); may be empty if the producer does not track gaps
    e2el: float | None  # s, send → last token
    success: bool
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return tpot(self)


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets in seconds: time to first token and time per output token."""

    ttft: float
    tpot: float

    def scaled(self, scale: float) -> "SLO":
        return SLO(self.ttft * scale, self.tpot * scale)


def tpot(record: RequestRecord) -> float | None:
    """Mean time per output token after the first; 0.0 for ≤ 1 token; None if it failed."""
    if not record.success or record.ttft is None or record.e2el is None:
        return None
    if record.output_len <= 1:
        return 0.0
    return (record.e2el - record.ttft) / (record.output_len - 1)


def meets(record: RequestRecord, slo: SLO, *, check_ttft: bool = True, check_tpot: bool = True) -> bool:
    """Whether a request is good under `slo` (only the checked targets count)."""
    if not record.success or record.ttft is None:
        return False
    if check_ttft and record.ttft > slo.ttft:
        return False
    if check_tpot:
        value = tpot(record)
        if value is None or value > slo.tpot:
            return False
    return True


def attainment(records: Sequence[RequestRecord], slo: SLO, *, check_ttft: bool = True,
               check_tpot: bool = True) -> float:
    """Fraction of ALL requests (failed included) that meet the checked SLO targets."""
    if not records:
        return 0.0
    num_good = sum(meets(r, slo, check_ttft=check_ttft, check_tpot=check_tpot) for r in records)
    return num_good / len(records)


def _stats(name: str, values: Iterable[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 under `name_*`; None when there are no values."""
    arr = np.asarray(list(values), dtype=float)
    keys = (f"{name}_mean", f"{name}_median", f"{name}_std", f"{name}_p90", f"{name}_p99")
    if arr.size == 0:
        return dict.fromkeys(keys, None)
    p50, p90, p99 = np.percentile(arr, PERCENTILES)
    return dict(zip(keys, (float(arr.mean()), float(p50), float(arr.std()), float(p90), float(p99))))


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None,
              num_gpus: int = 1) -> dict[str, float | int | None]:
    """Everything a benchmark reports, as a flat dict (latencies in seconds).

    Latency statistics cover successful requests; TPOT statistics only those with more than one
    output token (vLLM). Rates divide by `duration_s`, the benchmark's wall (or virtual) duration;
    a non-positive duration gives zero rates rather than an exception.
    """
    done = [r for r in records if r.success]
    rate = (lambda count: count / duration_s) if duration_s > 0 else (lambda count: 0.0)
    num_input = sum(r.input_len for r in done)
    num_output = sum(r.output_len for r in done)
    summary: dict[str, float | int | None] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": float(duration_s),
        "num_gpus": num_gpus,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput_rps": rate(len(done)),
        "output_throughput_tps": rate(num_output),
        "total_token_throughput_tps": rate(num_input + num_output),
    }
    summary |= _stats("ttft", (r.ttft for r in done if r.ttft is not None))
    summary |= _stats("tpot", (t for r in done if r.output_len > 1 and (t := tpot(r)) is not None))
    summary |= _stats("itl", (gap for r in done for gap in r.itl))
    summary |= _stats("e2el", (r.e2el for r in done if r.e2el is not None))

    num_good = None if slo is None else sum(meets(r, slo) for r in records)
    goodput = None if num_good is None else rate(num_good)
    summary |= {
        "slo_ttft_s": None if slo is None else slo.ttft,
        "slo_tpot_s": None if slo is None else slo.tpot,
        "num_good": num_good,
        "slo_attainment": None if slo is None else attainment(records, slo),
        "ttft_attainment": None if slo is None else attainment(records, slo, check_tpot=False),
        "tpot_attainment": None if slo is None else attainment(records, slo, check_ttft=False),
        "goodput_rps": goodput,
        "goodput_rps_per_gpu": None if goodput is None else goodput / max(num_gpus, 1),
    }
    return summary


def distserve_goodput(attainment_at_rate: Callable[[float], float], lo: float, hi: float,
                      target: float = 0.9, tol: float = 0.01, max_iters: int = 60) -> float:
    """Highest rate in [lo, hi] whose attainment is ≥ target, by bisection (DistServe).

    Assumes attainment does not rise with rate. Pass a function of the per-GPU rate to get
    DistServe's per-GPU goodput. Returns `hi` if even `hi` passes and 0.0 if `lo` fails;
    otherwise a passing rate within `tol` (req/s) of the threshold.
    """
    if attainment_at_rate(hi) >= target:
        return hi
    if attainment_at_rate(lo) < target:
        return 0.0
    for _ in range(max_iters):
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        if attainment_at_rate(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def interpolate_goodput(rates: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> float:
    """Highest rate where the piecewise-linear attainment-vs-rate curve is ≥ target.

    For a measured sweep; beyond the highest measured rate nothing is extrapolated, and 0.0 means
    no measured point reached the target.
    """
    if len(rates) != len(attainments):
        raise ValueError("rates and attainments differ in length")
    points = sorted(zip(rates, attainments))
    if not points:
        return 0.0
    if points[-1][1] >= target:
        return float(points[-1][0])
    for (r0, a0), (r1, a1) in zip(reversed(points[:-1]), reversed(points[1:])):
        if a0 >= target:  # a1 < target here, else a higher segment would have returned
            return float(r0 + (a0 - target) / (a0 - a1) * (r1 - r0))
    return 0.0


def slo_scale_curve(records: Sequence[RequestRecord], slo: SLO,
                    scales: Sequence[float] = DEFAULT_SLO_SCALES) -> list[tuple[float, float]]:
    """Joint attainment with both targets multiplied by each scale (DistServe's SLO-scale plot)."""
    return [(scale, attainment(records, slo.scaled(scale))) for scale in scales]


def min_slo_scale(records: Sequence[RequestRecord], slo: SLO, target: float = 0.9,
                  scales: Sequence[float] = DEFAULT_SLO_SCALES) -> float | None:
    """Smallest scale whose joint attainment is still ≥ target (None if none is)."""
    passing = [scale for scale, value in slo_scale_curve(records, slo, scales) if value >= target]
    return min(passing) if passing else None


def encode_records(records: Iterable[RequestRecord]) -> bytes:
    """JSON Lines, the on-disk form shared by the benchmark and the simulator."""
    encoder = msgspec.json.Encoder()
    return b"".join(encoder.encode(r) + b"\n" for r in records)


def decode_records(data: bytes) -> list[RequestRecord]:
    decoder = msgspec.json.Decoder(RequestRecord)
    return [decoder.decode(line) for line in data.splitlines() if line.strip()]


def _fmt(value: float | int | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(summary: dict[str, float | int | None]) -> str:
    """Plain markdown tables of the headline numbers (latencies shown in ms) for scripts."""
    s = summary
    rows = [
        ("requests (completed / failed)", f"{s['num_completed']} / {s['num_failed']}"),
        ("duration (s)", _fmt(s["duration_s"])),
        ("request throughput (req/s)", _fmt(s["request_throughput_rps"], digits=3)),
        ("output throughput (tok/s)", _fmt(s["output_throughput_tps"], digits=1)),
        ("total token throughput (tok/s)", _fmt(s["total_token_throughput_tps"], digits=1)),
    ]
    if s.get("slo_attainment") is not None:
        rows += [
            ("SLO (TTFT / TPOT, ms)", f"{_fmt(s['slo_ttft_s'], 1e3, 0)} / {_fmt(s['slo_tpot_s'], 1e3, 0)}"),
            ("SLO attainment (joint)", _fmt(s["slo_attainment"], 100, 1) + " %"),
            ("TTFT-only / TPOT-only attainment", f"{_fmt(s['ttft_attainment'], 100, 1)} % / "
                                                 f"{_fmt(s['tpot_attainment'], 100, 1)} %"),
            ("goodput (req/s)", _fmt(s["goodput_rps"], digits=3)),
            (f"goodput per GPU (req/s, {s['num_gpus']} GPUs)", _fmt(s["goodput_rps_per_gpu"], digits=3)),
        ]
    lines = ["| metric | value |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]
    lines += ["", "| latency (ms) | mean | median | p90 | p99 |", "| --- | --- | --- | --- | --- |"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        cells = " | ".join(_fmt(s.get(f"{name}_{stat}"), 1e3) for stat in ("mean", "median", "p90", "p99"))
        lines.append(f"| {name.upper()} | {cells} |")
    return "\n".join(lines)
