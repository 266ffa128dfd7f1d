"""Simulate a workload on N workers under a policy, on a virtual clock, in seconds.

The server's flags mean here what they mean to `python dopd.py --engine mock` (the same cost
model, worker count, start split, scheduler limits and policy settings; `--policy` is `--mode`);
the workload comes from a trace or a synthetic spec. Writes a summary and per-request records in
the benchmark's schema.

    python scripts/simulate.py --trace ../shared/data/azure_llm_2023_conv.csv --gpus 8 --hardware h100 \\
        --model-profile llama3-70b-fp8 --policy dopd --slo-ttft 1.5 --slo-tpot 0.05 --json out.json
    python scripts/simulate.py --synthetic "gamma:rate=6,burstiness=0.5,duration=600,in=azure-conv,out=azure-conv" \\
        --rates 2,4,8,16 --policy static --pd-ratio 2:2 --gpus 8 --model-profile llama3-70b-fp8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

import msgspec  # noqa: E402

from dopd.config import DopdConfig, add_arguments, from_args  # noqa: E402
from dopd.metrics import format_table, interpolate_goodput, encode_records  # noqa: E402
from dopd.sim.simulator import Simulator, sim_config  # noqa: E402
from dopd.workload import describe, load_trace, scale_rate, shape, synthetic  # noqa: E402


def workload(args: argparse.Namespace) -> list:
    if bool(args.trace) == bool(args.synthetic):
        sys.exit("give one of --trace FILE or --synthetic SPEC")
    reqs = load_trace(args.trace) if args.trace else synthetic(args.synthetic, seed=args.seed)
    return shape(reqs, args.rate_scale, args.num_requests, args.duration, args.max_input_len, args.max_output_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, DopdConfig)
    w = parser.add_argument_group("workload")
    w.add_argument("--trace", help="Azure CSV, Mooncake JSONL, BurstGPT CSV or ShareGPT JSON")
    w.add_argument("--synthetic", metavar="SPEC", help="a dopd.workload.synthetic spec")
    w.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    w.add_argument("--rates", help="R1,R2,...: a sweep over these mean rates (req/s) of the same request shapes")
    w.add_argument("--num-requests", type=int)
    w.add_argument("--duration", type=float, help="only requests arriving in the first S seconds")
    w.add_argument("--max-input-len", type=int)
    w.add_argument("--max-output-len", type=int)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--json", type=Path, help="summary and per-request records")
    w.add_argument("--records", type=Path, help="per-request records as JSON Lines")
    argv = ["--mode" if a == "--policy" else a for a in sys.argv[1:]]
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in {a.dest for a in w._group_actions}}
    cfg = sim_config(from_args(DopdConfig, flags))
    base = workload(args)
    stats = describe(base)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
    runs = []
    for rate in rates:
        reqs = base if rate is None else scale_rate(base, rate / stats["rate_rps"])
        start = time.perf_counter()
        result = Simulator(cfg, reqs).run()
        runs.append((rate, result, time.perf_counter() - start))
    rate, result, wall = runs[-1]
    out = {**result.summary, "policy": cfg.policy, "num_workers": cfg.num_workers, "profile": cfg.cost.name,
           "workload": stats, "wall_s": wall, "role_changes": result.role_changes, "timeline": result.timeline}
    if len(runs) > 1:
        gpus = cfg.num_workers * cfg.cost.num_gpus
        sweep = [(r / gpus, res.summary["slo_attainment"]) for r, res, _ in runs]
        out["sweep"] = [{"rate_rps": r, **{k: res.summary[k] for k in ("goodput_rps", "slo_attainment", "ttft_p90",
                                                                     "tpot_p90")}} for r, res, _ in runs]
        out["distserve_goodput_per_gpu"] = interpolate_goodput([r for r, _ in sweep], [a for _, a in sweep])
    print(format_table(result.summary))
    print(f"\n{len(result.records)} requests on {cfg.num_workers} workers ({cfg.cost.name}) under {cfg.policy}: "
          f"simulated in {wall:.1f} s; {len(result.role_changes)} role moves")
    if "sweep" in out:
        for row in out["sweep"]:
            print(f"  rate {row['rate_rps']:.2f} req/s: attainment {row['slo_attainment']:.1%}, goodput "
                  f"{row['goodput_rps']:.2f} req/s")
        print(f"DistServe goodput: {out['distserve_goodput_per_gpu']:.3f} req/s per GPU at 90% attainment")
    if args.json:
        out["records"] = msgspec.to_builtins(result.records)
        args.json.write_text(json.dumps(out, indent=1))
    if args.records:
        args.records.write_bytes(encode_records(result.records))


if __name__ == "__main__":
    main()
