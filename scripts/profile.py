"""Profile the real engine on this machine and fit the cost model to it.

Times one engine step (`ModelRunner.execute`, the worker's forward pass and sampling) over a grid
of batch shapes — prefills of one or several prompts, chunks on top of cached tokens, decode
batches over a range of sizes and contexts — then fits the DistServe-form coefficients
(`dopd.sim.costmodel.fit`; on CPU decodes of under Linear.MIN_PACKED_ROWS sequences, which run
the plain GEMV, as a regime of their own, unless the model's GGUF blocks serve all of them) on
part of the grid and reports the error on the rest, shapes the fit never saw. The profile is
written as JSON for `--model-profile` (server, mock engine, simulator); the default path is the one
the server looks in for this model and device.

    python scripts/profile.py [--model smollm2] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the stdlib's `profile`, which torch imports (through cProfile): every script
# takes scripts/ off its path, so that `import profile` anywhere finds the stdlib's, and imports its
# siblings as `scripts.<name>`.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

import torch  # noqa: E402

from dopd.embedded import resolve_model  # noqa: E402
from dopd.kv.blocks import blocks_needed  # noqa: E402
from dopd.sampling_params import SamplingParams  # noqa: E402
from dopd.scheduler import ScheduledBatch  # noqa: E402
from dopd.sequence import Sequence  # noqa: E402
from dopd.sim.costmodel import CostModel, Link, fit, relative_errors  # noqa: E402
from dopd.workers import loader  # noqa: E402
from dopd.workers.model import Linear  # noqa: E402
from dopd.workers.runner import ModelRunner, RunnerSpec  # noqa: E402

PARAMS = SamplingParams(max_tokens=None, temperature=0.0)
# (new tokens, cached tokens) per prompt of a prefill step
PREFILL_GRID = [[(n, 0)] for n in (16, 32, 64, 128, 192, 256, 384, 512)] + [
    [(64, 0)] * 2, [(32, 0)] * 4, [(128, 0)] * 3, [(256, 0), (64, 0)], [(128, 256)], [(64, 512)], [(256, 256)],
]
PREFILL_HELD_OUT = [[(96, 0)], [(320, 0)], [(48, 0)] * 3, [(200, 100)], [(160, 0), (32, 0)]]
# (batch size, context per sequence); shapes beyond the worker's KV pool are dropped, since a
# worker never runs them (and the profile's sequences would share blocks, faster than real ones).
# 24 and 40 sequences: a decode step's cost is not linear in its rows past 16 (the GGUF kernel's
# tile), nor in its context once the KV it reads outgrows the cache; the fit needs both regions.
DECODE_GRID = [(b, c) for b in (1, 2, 3, 4, 8, 16, 24, 32, 40, 64) for c in (16, 128, 256, 512, 1024)]
DECODE_HELD_OUT = [(3, 300), (12, 64), (20, 400), (48, 200), (6, 900), (40, 250)]


def make_batch(runner: ModelRunner, shapes: list[tuple[int, int]]) -> ScheduledBatch:
    """Sequences with `cached` tokens already in the pool and `new` to compute, blocks allocated."""
    batch = ScheduledBatch()
    next_block = 0
    for new, cached in shapes:
        seq = Sequence("p", [7] * (cached + new), cached + new, PARAMS, 1)
        seq.num_computed_tokens = cached
        n_blocks = blocks_needed(cached + new, runner.block_size)
        seq.block_ids = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        batch.seqs.append(seq)
        batch.num_new_tokens.append(new)
    return batch


def measure(runner: ModelRunner, prefill: list, decode: list, rounds: int, seed: int = 0) -> list:
    """Samples (kind, shape, median seconds) for every shape given.

    Every shape is timed once per round, in a new random order each round: on a shared VM whose
    speed drifts by tens of percent over a minute, timing the fitted grid first and the held-out
    shapes after it made the whole held-out set look 10-20% faster than the fit (a drift, not an
    error of the model).
    """
    items = [("prefill", shapes, make_batch(runner, shapes)) for shapes in prefill]
    items += [("decode", (b, b * c), make_batch(runner, [(1, c - 1)] * b)) for b, c in decode]
    for _, _, batch in items:
        runner.execute(batch)  # warm-up
    times: list[list[float]] = [[] for _ in items]
    order = list(range(len(items)))
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            start = time.perf_counter()
            runner.execute(items[i][2])
            times[i].append(time.perf_counter() - start)
    return [(kind, shape, statistics.median(t)) for (kind, shape, _), t in zip(items, times)]


def copy_bandwidth() -> float:
    """Bytes per second of a plain copy here: what a shared-memory KV pull runs at."""
    src, dst = torch.randn(64 * 2**20 // 4), torch.empty(64 * 2**20 // 4)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * src.numel() * 4 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a worker gets (cores / workers)")
    parser.add_argument("--rounds", type=int, default=9, help="timings of each shape (their median is used)")
    parser.add_argument("--out", type=Path, default=None, help="default: dopd/profiles/<device>-<model dir>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    device = loader.resolve_device(args.device)
    arch = loader.load_arch(model_dir)
    spec = RunnerSpec(str(model_dir), str(device), "auto", loader.default_attention(device), 2048, 16, None, None,
                      args.threads, arch)
    runner = ModelRunner(spec)
    too_big = [(b, c) for b, c in DECODE_GRID + DECODE_HELD_OUT if b * blocks_needed(c, runner.block_size) > runner.num_blocks]
    if too_big:
        print(f"left out, beyond the {runner.num_blocks}-block KV pool: {too_big}", file=sys.stderr)
    decode_grid = [s for s in DECODE_GRID if s not in too_big]
    decode_held_out = [s for s in DECODE_HELD_OUT if s not in too_big]
    samples = measure(runner, PREFILL_GRID + PREFILL_HELD_OUT, decode_grid + decode_held_out, args.rounds)
    is_held_out = [False] * len(PREFILL_GRID) + [True] * len(PREFILL_HELD_OUT) \
        + [False] * len(decode_grid) + [True] * len(decode_held_out)
    fitted = [x for x, held in zip(samples, is_held_out) if not held]
    held_out = [x for x, held in zip(samples, is_held_out) if held]
    element = torch.empty((), dtype=runner.kv_dtype).element_size()
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    bandwidth = copy_bandwidth() if device.type == "cpu" else 0.0
    base = CostModel(
        name=f"{device.type}-{model_dir.name}", prefill_a=0, prefill_b=0, prefill_c=0, decode_a=0, decode_b=0,
        decode_c=0, kv_bytes_per_token=arch.kv_bytes_per_token * element,
        kv_capacity_tokens=runner.num_blocks * runner.block_size, weight_bytes=weights, mem_bw=bandwidth,
        hardware=device.type, link=Link("shared-memory" if device.type == "cpu" else "cuda-ipc", bandwidth or 1e11,
                                        50e-6),
    )
    # Below this many rows our CPU Linear runs the plain GEMV, not the packed GEMM: another regime
    # (if any weight is large enough to be packed at all). A model with GGUF blocks runs every decode
    # of the grid (up to gguf.MAX_ROWS sequences) through its kernel: one regime.
    packed = any(getattr(m, "packed", None) is not None for m in runner.model.modules())
    blocks = any(getattr(m, "blocks", None) is not None for m in runner.model.modules())
    small_rows = Linear.MIN_PACKED_ROWS if packed and not blocks else 0
    model = fit(fitted, base=base, name=base.name, small_batch_rows=small_rows)
    errors = relative_errors(model, held_out)
    out = args.out or ROOT / "dopd" / "profiles" / f"{device.type}-{model_dir.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    rows = [{"kind": kind, "shape": shape, "measured_ms": t * 1e3, "predicted_ms": (t * (1 + e)) * 1e3,
             "error": e} for (kind, shape, t), e in zip(held_out, errors)]
    report = {"profile": str(out), "threads": args.threads, "num_fitted": len(fitted),
              "held_out_median_abs_error": statistics.median(abs(e) for e in errors),
              "held_out_max_abs_error": max(abs(e) for e in errors), "held_out": rows}
    print(json.dumps(report, indent=2, default=str))
    print()
    print("| step (held out) | measured ms | predicted ms | error |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} {r['shape']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['error']:+.1%} |")


if __name__ == "__main__":
    main()
