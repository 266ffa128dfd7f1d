"""The paper's three experiments at its scale, in the simulator: 8 GPUs, a 70B-class model.

    python scripts/experiments.py ratio    # (a) fixed lengths, sweep N_P: does the computed ratio hit the optimum?
    python scripts/experiments.py static   # (b) colocated / static / dopd at equal GPUs on Azure conv and code
    python scripts/experiments.py dynamic  # (c) a bursty, shifting replay from 1P+1D: dopd vs load_threshold, sla
    python scripts/experiments.py all [--quick] [--out results/experiments]

Goodput is DistServe's: the highest request rate (per GPU) at which ≥90% of requests meet both the
TTFT and the TPOT SLO, found by bisection over the rate (the workload's arrival times scaled).
Each experiment writes <name>.json and <name>.md under --out, and prints the table.
The same policies, scheduler and cost model run the live mock server (scripts/compare.py --live).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

from dopd.metrics import SLO, distserve_goodput  # noqa: E402
from dopd.policy.ratio import clamp, optimal_split  # noqa: E402
from dopd.sim.costmodel import get_profile  # noqa: E402
from dopd.sim.simulator import SimConfig, Simulator  # noqa: E402
from dopd.workload import describe, load_trace, scale_rate, synthetic, take  # noqa: E402

HARDWARE, PROFILE = "h200", "llama3-70b-fp8"  # 8 H100-class GPUs, one worker each (70B FP8 fits one H200)
NUM_WORKERS = 8
SLO_DEFAULT = SLO(1.5, 0.05)  # the paper's planner configs for 70B-FP8: TTFT 1.5 s, ITL 50 ms
DATA = ROOT.parent / "shared" / "data"
SHIFTING = ";".join([  # Azure conversation, then bursty code, then long context, then conversation again
    "poisson:rate=18,duration=300,in=azure-conv,out=azure-conv",
    "gamma:rate=14,burstiness=0.25,duration=300,in=azure-code,out=azure-code",
    "poisson:rate=3,duration=300,in=mooncake,out=mooncake,max_in=6000",
    "poisson:rate=18,duration=300,in=azure-conv,out=azure-conv",
])


def run(cfg: SimConfig, reqs: list) -> dict:
    span = max(r.arrival_time for r in reqs)
    result = Simulator(replace(cfg, max_time=1.2 * span + 120), reqs).run()
    return {**{k: result.summary[k] for k in ("slo_attainment", "goodput_rps", "ttft_p90", "tpot_p90",
                                               "num_requests", "num_failed")},
            "gpu_seconds": result.gpu_seconds, "num_moves": len(result.role_changes)}


def goodput(cfg: SimConfig, base: list, lo: float, hi: float, tol: float) -> float:
    """DistServe goodput in req/s per GPU: bisection over the rate scale of `base`."""
    rate = describe(base)["rate_rps"]
    gpus = cfg.num_workers * cfg.cost.num_gpus
    found = distserve_goodput(lambda s: run(cfg, scale_rate(base, s))["slo_attainment"], lo, hi, tol=tol)
    return found * rate / gpus


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def config(policy: str, split: tuple[int, int] | None, **kw) -> SimConfig:
    cost = get_profile(PROFILE, HARDWARE)
    return SimConfig(cost=cost, num_workers=NUM_WORKERS, policy=policy, pd_ratio=split, slo=SLO_DEFAULT, **kw)


# ---- (a) ratio validation ---------------------------------------------------------------------------

def ratio_experiment(quick: bool) -> dict:
    """Fixed input/output lengths; static splits N_P = 1..7; the goodput optimum against the computed split."""
    cost = get_profile(PROFILE, HARDWARE)
    shapes = [(1000, 200), (2000, 50), (500, 500)] if not quick else [(1000, 200)]
    n = 600 if quick else 1500
    rows = []
    for isl, osl in shapes:
        base = synthetic(f"poisson:rate=1,n={n},in={isl},out={osl}", seed=0)
        by_split = {p: goodput(config("static", (p, NUM_WORKERS - p)), base, 1, 200, 0.5)
                    for p in range(1, NUM_WORKERS)}
        best = max(by_split, key=by_split.get)
        s = optimal_split(cost, 1.0, isl, 0.0, osl, SLO_DEFAULT.tpot, NUM_WORKERS)
        computed, _, _ = clamp(s.ratio, 1.0, NUM_WORKERS, park=False)
        rows.append({"isl": isl, "osl": osl, "ratio": s.ratio, "computed_np": computed, "best_np": best,
                     "goodput_at_computed": by_split[computed], "goodput_at_best": by_split[best],
                     "computed_vs_best": by_split[computed] / by_split[best],
                     **{f"np{p}": g for p, g in by_split.items()}})
    cols = ["isl", "osl", "ratio", "computed_np", "best_np", "computed_vs_best"] + [f"np{p}" for p in range(1, 8)]
    return {"rows": rows, "markdown": table(rows, cols)}


# ---- (b) static comparison --------------------------------------------------------------------------

def static_experiment(quick: bool) -> dict:
    """Azure conversation and code at equal GPUs: colocated (its best chunk budget), every static split, dopd."""
    n = 3000 if quick else 8000
    rows = []
    for trace in ("azure_llm_2023_conv.csv", "azure_llm_2023_code.csv"):
        base = take(load_trace(DATA / trace), n=n)
        systems = {f"colocated-{b}": config("colocated", None, max_num_batched_tokens=b) for b in (512, 2048, 8192)}
        systems |= {f"static-{p}:{NUM_WORKERS - p}": config("static", (p, NUM_WORKERS - p))
                    for p in range(1, NUM_WORKERS)}
        systems["dopd"] = config("dopd", (NUM_WORKERS // 2, NUM_WORKERS // 2))
        results = {name: goodput(cfg, base, 0.5, 40, 0.1) for name, cfg in systems.items()}
        colocated = max((k for k in results if k.startswith("colocated")), key=results.get)
        static = max((k for k in results if k.startswith("static")), key=results.get)
        at = {name: run(systems[name], base) for name in (colocated, static, "dopd")}
        rows.append({"trace": trace, "best_colocated": colocated, "colocated": results[colocated],
                     "best_static": static, "static": results[static], "dopd": results["dopd"],
                     "dopd_vs_colocated": results["dopd"] / results[colocated],
                     "dopd_vs_static": results["dopd"] / results[static],
                     "ttft_p90_static": at[static]["ttft_p90"], "ttft_p90_dopd": at["dopd"]["ttft_p90"],
                     "tpot_p90_colocated": at[colocated]["tpot_p90"], "tpot_p90_dopd": at["dopd"]["tpot_p90"],
                     "all": results})
    cols = ["trace", "best_colocated", "colocated", "best_static", "static", "dopd", "dopd_vs_colocated",
            "dopd_vs_static", "ttft_p90_static", "ttft_p90_dopd", "tpot_p90_colocated", "tpot_p90_dopd"]
    return {"rows": rows, "markdown": table(rows, cols)}


# ---- (c) dynamic replay -----------------------------------------------------------------------------

def dynamic_experiment(quick: bool) -> dict:
    """The shifting replay: attainment at the base rate, goodput over rate, GPU-seconds, from 1P+1D."""
    spec = SHIFTING if not quick else SHIFTING.replace("duration=300", "duration=100")
    base = synthetic(spec, seed=1)
    systems = {f"colocated-{b}": config("colocated", None, max_num_batched_tokens=b) for b in (512, 2048, 8192)}
    systems |= {f"static-{p}:{NUM_WORKERS - p}": config("static", (p, NUM_WORKERS - p)) for p in (3, 4, 5, 6, 7)}
    systems |= {name: config(name, (1, 1)) for name in ("load_threshold", "sla", "dopd")}
    rows = []
    for name, cfg in systems.items():
        at_base = run(cfg, base)
        rows.append({"system": name, "attainment": at_base["slo_attainment"], "ttft_p90": at_base["ttft_p90"],
                     "tpot_p90": at_base["tpot_p90"], "gpu_seconds": at_base["gpu_seconds"],
                     "moves": at_base["num_moves"], "goodput_per_gpu": goodput(cfg, base, 0.5, 4, 0.02)})
    by = {r["system"]: r for r in rows}
    statics = [r for r in rows if r["system"].startswith("static")]
    best_static = max(statics, key=lambda r: r["goodput_per_gpu"])
    colocated = max((r for r in rows if r["system"].startswith("colocated")), key=lambda r: r["goodput_per_gpu"])
    summary = {
        "dopd_vs_colocated": by["dopd"]["goodput_per_gpu"] / colocated["goodput_per_gpu"],
        "best_colocated": colocated["system"],
        "dopd_vs_best_static": by["dopd"]["goodput_per_gpu"] / best_static["goodput_per_gpu"],
        "best_static": best_static["system"],
        "ttft_p90_reduction_vs_best_static": 1 - by["dopd"]["ttft_p90"] / best_static["ttft_p90"],
        "ttft_p90_reduction_vs_worst_static": 1 - by["dopd"]["ttft_p90"] / max(r["ttft_p90"] for r in statics),
    }
    cols = ["system", "attainment", "ttft_p90", "tpot_p90", "goodput_per_gpu", "gpu_seconds", "moves"]
    return {"workload": describe(base), "rows": rows, "summary": summary, "markdown": table(rows, cols)}


EXPERIMENTS = {"ratio": ratio_experiment, "static": static_experiment, "dynamic": dynamic_experiment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=(*EXPERIMENTS, "all"))
    parser.add_argument("--quick", action="store_true", help="smaller workloads: minutes instead of tens")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "experiments")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in EXPERIMENTS if args.which == "all" else [args.which]:
        start = time.perf_counter()
        result = EXPERIMENTS[name](args.quick)
        result["wall_s"] = time.perf_counter() - start
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=lambda o: None))
        (args.out / f"{name}.md").write_text(result["markdown"] + "\n")
        print(f"## ({name}) in {result['wall_s']:.0f} s\n\n{result['markdown']}\n")
        if "summary" in result:
            print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
