"""Does the simulator predict the live mock server? The same workload, both ways, side by side.

For each system (server flags), the mock-engine server is started and driven over HTTP by the
benchmark (`bench.run_workload`), and the simulator runs the same requests under the same flags
(`dopd.sim.simulator.sim_config`). Reported: SLO attainment (points apart) and goodput (relative).
The target: within 3 points of attainment and 10% of goodput.

    python scripts/validate_sim.py [--synthetic SPEC | --trace FILE [--num-requests N] [--rate-scale X]
                                   [--max-input-len L]] [--system NAME=FLAGS ...] [--json OUT]

A Mooncake trace's shared prefixes reach both sides: the benchmark sends them as shared token ids,
and the simulator's prefix cache keys its blocks the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py
sys.path.insert(0, str(ROOT / "tests"))

from scripts import bench  # noqa: E402
from dopd.config import DopdConfig, add_arguments, from_args  # noqa: E402
from dopd.metrics import summarize  # noqa: E402
from dopd.sim.simulator import Simulator, sim_config  # noqa: E402
from dopd.workload import load_trace, shape, synthetic  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

COMMON = "--model tiny --engine mock --hardware h100 --model-profile llama3-70b-fp8 --gpus 8 --slo-ttft 1.5 --slo-tpot 0.05"
SYSTEMS = {
    "colocated": "--mode colocated --max-num-batched-tokens 2048",
    "static-2:2": "--mode static --pd-ratio 2:2",
    "static-3:1": "--mode static --pd-ratio 3:1",
    "dopd": "--mode dopd --pd-ratio 1:1 --policy-interval 5",
}
WORKLOAD = "poisson:rate=5,duration=60,in=azure-conv,out=azure-conv,max_in=4000"


def parse(flags: list[str]) -> DopdConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DopdConfig)
    return from_args(DopdConfig, vars(parser.parse_args(flags)))


def live(flags: list[str], reqs: list) -> tuple[list, float]:
    server = ServerProcess(*flags)
    try:
        model = server.get("/v1/models")["data"][0]["id"]
        return asyncio.run(bench.run_workload(server.url, model, reqs))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", default=WORKLOAD)
    parser.add_argument("--trace", help="a trace file instead (Azure CSV, Mooncake JSONL, ...)")
    parser.add_argument("--num-requests", type=int, help="the trace's first N requests")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's rate")
    parser.add_argument("--max-input-len", type=int, help="clamp the trace's prompt lengths")
    parser.add_argument("--common", default=COMMON, help="server flags every system shares")
    parser.add_argument("--system", action="append", help="NAME=FLAGS (default: colocated, two statics, dopd)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    systems = dict(s.split("=", 1) for s in args.system) if args.system else SYSTEMS
    if args.trace:
        reqs = shape(load_trace(args.trace), args.rate_scale, args.num_requests, max_input_len=args.max_input_len)
    else:
        reqs = synthetic(args.synthetic, seed=args.seed)
    rows = []
    for name, extra in systems.items():
        flags = shlex.split(args.common) + shlex.split(extra)
        cfg = sim_config(parse(flags))
        records, duration = live(flags, reqs)
        live_summary = summarize(records, duration, cfg.slo)
        sim = Simulator(cfg, reqs).run()
        sim_summary = summarize(sim.records, duration, cfg.slo)  # the same duration: goodput is per second of load
        row = {"system": name}
        for key in ("slo_attainment", "goodput_rps", "ttft_p90", "tpot_p90"):
            row[f"live_{key}"], row[f"sim_{key}"] = live_summary[key], sim_summary[key]
        row["attainment_points_apart"] = 100 * abs(row["live_slo_attainment"] - row["sim_slo_attainment"])
        row["goodput_relative_diff"] = abs(row["live_goodput_rps"] - row["sim_goodput_rps"]) / max(
            1e-9, row["live_goodput_rps"])
        rows.append(row)
        print(f"{name}: live {row['live_slo_attainment']:.3f} / sim {row['sim_slo_attainment']:.3f} attainment, "
              f"goodput {row['live_goodput_rps']:.2f} / {row['sim_goodput_rps']:.2f} req/s", flush=True)
    print()
    print("| system | attainment live / sim | points apart | goodput live / sim (req/s) | rel. diff | "
          "TTFT p90 live / sim (s) | TPOT p90 live / sim (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['live_slo_attainment']:.3f} / {r['sim_slo_attainment']:.3f} | "
              f"{r['attainment_points_apart']:.1f} | {r['live_goodput_rps']:.2f} / {r['sim_goodput_rps']:.2f} | "
              f"{r['goodput_relative_diff']:.1%} | {r['live_ttft_p90']:.2f} / {r['sim_ttft_p90']:.2f} | "
              f"{r['live_tpot_p90'] * 1e3:.1f} / {r['sim_tpot_p90'] * 1e3:.1f} |")
    if args.json:
        workload = args.trace or args.synthetic
        args.json.write_text(json.dumps({"workload": workload, "common": args.common, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
