"""KV handoff: how fast a decode worker pulls blocks out of another process's pool.

The same code path as a real handoff: the source process allocates its KV pool (shared memory on
CPU) and shares it once over a `torch.multiprocessing` pipe; the puller then copies blocks by id
with `KVPool.copy_blocks_from` into its own pool. Beside it, the same bytes copied inside one
process (a plain `copy_` between two tensors): the ceiling. Block ids are either consecutive (what
the allocator usually hands out) or scattered (a fragmented pool). Latency adds one controller →
worker → controller message round trip, measured on the same pipe.

    python scripts/bench_handoff.py [--blocks 1 4 16 64 256 1024] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

from dopd.kv.pool import KVPool, KVPoolShape  # noqa: E402

# SmolLM2-135M's KV layout: 30 layers, 3 KV heads of 64, float32 on CPU, 16-token blocks: 720 KiB a block.
SHAPE = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)


def source_main(conn, num_blocks: int) -> None:
    pool = KVPool.allocate(KVPoolShape(num_blocks, **SHAPE), torch.float32, "cpu")
    pool.tensor.normal_()
    conn.send(pool.tensor)  # shared once, as in READY
    while (msg := conn.recv_bytes()) != b"stop":
        conn.send_bytes(msg)  # echo: the message round trip


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a worker's copy runs on its own thread
    pool_blocks = 2 * max(args.blocks)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=source_main, args=(child, pool_blocks), daemon=True)
    proc.start()
    remote = parent.recv()
    mine = KVPool.allocate(KVPoolShape(pool_blocks, **SHAPE), torch.float32, "cpu")
    local_src = torch.randn_like(remote)
    rtt = timed(lambda: (parent.send_bytes(b"x" * 64), parent.recv_bytes()), 200)
    rng = random.Random(0)
    rows = []
    for n in args.blocks:
        nbytes = n * mine.bytes_per_block
        consecutive = list(range(n))
        scattered = rng.sample(range(pool_blocks), n)
        dst = list(range(n))
        ipc = timed(lambda: mine.copy_blocks_from(remote, consecutive, dst), args.repeat)
        ipc_scattered = timed(lambda: mine.copy_blocks_from(remote, scattered, dst), args.repeat)
        plain = timed(lambda: mine.tensor[:n].copy_(local_src[:n]), args.repeat)
        rows.append({
            "blocks": n, "mib": nbytes / 2**20,
            "pull_gb_s": nbytes / ipc / 1e9, "pull_scattered_gb_s": nbytes / ipc_scattered / 1e9,
            "in_process_copy_gb_s": nbytes / plain / 1e9, "fraction_of_copy": plain / ipc,
            "fraction_of_copy_scattered": plain / ipc_scattered,
            "latency_ms": (ipc + rtt) * 1e3, "latency_scattered_ms": (ipc_scattered + rtt) * 1e3,
        })
    parent.send_bytes(b"stop")
    proc.join(5)
    print(json.dumps({"message_rtt_ms": rtt * 1e3, "rows": rows}, indent=2))
    print()
    print(f"message round trip {rtt * 1e3:.3f} ms")
    print("| blocks | MiB | pull GB/s | pull scattered GB/s | in-process copy GB/s | pull / copy | latency ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['mib']:.1f} | {r['pull_gb_s']:.1f} | {r['pull_scattered_gb_s']:.1f} | "
              f"{r['in_process_copy_gb_s']:.1f} | {r['fraction_of_copy']:.0%} | {r['latency_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"message_rtt_ms": rtt * 1e3, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
