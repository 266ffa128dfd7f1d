#!/usr/bin/env python
"""Plots of a comparison (compare.py's results.json and record files), as PNGs.

    python scripts/plot.py runs/cmp          # redraw runs/cmp/*.png from runs/cmp/results.json

- attainment_vs_rate.png: joint SLO attainment against the per-GPU rate, one line per system, with
  the 90 % line whose crossing is DistServe's goodput (only when a rate sweep was run with SLOs);
- latency_cdf.png: TTFT and TPOT CDFs per system (the last, highest-rate run of each);
- pd_split.png: per system, the workers in each role over time (stacked) against the load — the
  client's arrival rate and the server's in-flight requests (the last run of each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server, and no GUI toolkit import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

from dopd.metrics import RequestRecord, decode_records, tpot  # noqa: E402

ROLE_COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green", "idle": "tab:gray"}


def _last_records(results: dict, out: Path) -> dict[str, list[RequestRecord]]:
    return {name: decode_records((out / system["runs"][-1]["records"]).read_bytes())
            for name, system in results["systems"].items() if system["runs"]}


def attainment_vs_rate(results: dict, path: Path) -> Path | None:
    """Attainment curves over a sweep; None (no file) without a sweep or without SLOs."""
    systems = {n: s for n, s in results["systems"].items() if len(s["runs"]) > 1}
    if not systems or results.get("slo") is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, system in systems.items():
        rates = [r["rate_per_gpu"] for r in system["runs"]]
        ax.plot(rates, [r["summary"]["slo_attainment"] * 100 for r in system["runs"]], "o-", label=name)
        if goodput := system.get("distserve_goodput_per_gpu"):
            ax.axvline(goodput, ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.axhline(90, color="k", ls="--", lw=0.8)
    ax.set(xlabel="rate per GPU (req/s)", ylabel="SLO attainment (%)", ylim=(0, 102),
           title="joint TTFT & TPOT attainment")
    ax.legend()
    return _save(fig, path)


def _cdf(ax, values: list[float], label: str) -> None:
    if values:
        xs = np.sort(values) * 1e3
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)


def latency_cdfs(records: dict[str, list[RequestRecord]], path: Path, slo: dict | None = None) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, recs in records.items():
        done = [r for r in recs if r.success]
        _cdf(left, [r.ttft for r in done if r.ttft is not None], name)
        _cdf(right, [t for r in done if r.output_len > 1 and (t := tpot(r)) is not None], name)
    for ax, metric in ((left, "ttft"), (right, "tpot")):
        if slo is not None and slo.get(metric) is not None:
            ax.axvline(slo[metric] * 1e3, color="k", ls="--", lw=0.8)
        ax.set(xlabel=f"{metric.upper()} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.legend()
    return _save(fig, path)


def arrival_rate(records: list[RequestRecord], bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Requests sent per second in bins of `bin_s` (bin centres, rates)."""
    times = np.array([r.arrival_time for r in records])
    if times.size == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, times.max() + bin_s, bin_s)
    counts, edges = np.histogram(times, bins=edges if edges.size > 1 else 1)
    return (edges[:-1] + edges[1:]) / 2, counts / np.diff(edges)


def pd_split(results: dict, records: dict[str, list[RequestRecord]], path: Path) -> Path:
    """One panel per system: role counts (stacked steps) and, on a second axis, the load."""
    names = list(records)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        series = results["systems"][name]["runs"][-1].get("split", [])
        end = max((r.arrival_time + (r.e2el or 0.0) for r in records[name]), default=0.0)
        if series:  # a split holds until the next sample: extend the first back to 0, the last to the end
            series = [{**series[0], "t": 0.0}, *series, {**series[-1], "t": max(end, series[-1]["t"])}]
        roles = [r for r in ROLE_COLORS if any(p["roles"].get(r) for p in series)]
        t = [p["t"] for p in series]
        if roles:
            ax.stackplot(t, *[[p["roles"].get(r, 0) for p in series] for r in roles], labels=roles, step="post",
                         colors=[ROLE_COLORS[r] for r in roles], alpha=0.6)
        ax.set(ylabel="workers", title=name)
        ax.legend(loc="upper left", fontsize="small")
        load = ax.twinx()
        if series and series[0].get("num_requests") is not None:  # the simulator's timeline has none
            load.plot(t, [p["num_requests"] for p in series], "k-", lw=1, label="in flight (server)")
        span = max((r.arrival_time for r in records[name]), default=0.0)
        centres, rates = arrival_rate(records[name], max(span / 30, 0.05))
        load.plot(centres, rates, "r--", lw=1, drawstyle="steps-mid", label="arrivals (req/s)")
        load.set_ylabel("load")
        load.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("time since the run started (s)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, out: Path) -> list[Path]:
    """Every plot that the results support, written into `out`; returns the files written."""
    records = _last_records(results, out)
    paths = [attainment_vs_rate(results, out / "attainment_vs_rate.png")]
    if records:
        paths += [latency_cdfs(records, out / "latency_cdf.png", results.get("slo")),
                  pd_split(results, records, out / "pd_split.png")]
    return [p for p in paths if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Redraw the PNGs of a compare.py output directory.")
    p.add_argument("out", type=Path, help="directory holding results.json and the record files")
    args = p.parse_args(argv)
    for path in plot_all(json.loads((args.out / "results.json").read_text()), args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
