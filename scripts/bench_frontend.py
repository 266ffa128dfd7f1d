"""Front-end throughput: streamed tokens/s the HTTP API sustains, the engine's cost taken out.

The server runs the mock engine with a constant step time (a cost-model profile whose only term is
a fixed per-step time), so its workers produce tokens as fast as the batch allows and what is
measured is the API path: worker → controller → detokenizer → SSE → client. The client opens
N concurrent streams and counts the tokens each receives (from the usage chunk), reading the
stream cheaply so that it disturbs the server as little as possible on the same cores.

    python scripts/bench_frontend.py [--streams 512] [--tokens 200] [--step-ms 5] [--gpus 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py
sys.path.insert(0, str(ROOT / "tests"))

from dopd.sim.costmodel import CostModel, Link  # noqa: E402
from serverproc import ServerProcess  # noqa: E402


def constant_profile(step_s: float, path: Path) -> Path:
    """A profile in which every step takes `step_s`, whatever the batch."""
    CostModel("constant", prefill_a=step_s, prefill_b=0, prefill_c=0, decode_a=step_s, decode_b=0, decode_c=0,
              kv_bytes_per_token=1, kv_capacity_tokens=10_000_000, weight_bytes=0, mem_bw=1e12,
              link=Link("instant", 1e15, 0.0)).save(path)
    return path


async def one_stream(session: aiohttp.ClientSession, url: str, tokens: int, prompt: list[int]) -> tuple[int, int]:
    """Returns (tokens received per usage, SSE events read)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events, last = 0, b""
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: "):
                events += 1
                if line.startswith(b'data: {"id"') and b'"usage"' in line:
                    last = line
    usage = json.loads(last[6:])["usage"]
    return usage["completion_tokens"], events


async def run(url: str, streams: int, tokens: int) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one_stream(session, url, 4, [500, 501])  # warm-up
        prompts = [[300 + (i * 7 + j) % 2000 for j in range(16)] for i in range(streams)]
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(session, url, tokens, p) for p in prompts))
        elapsed = time.perf_counter() - start
    received = sum(r[0] for r in results)
    events = sum(r[1] for r in results)
    return {"streams": streams, "tokens_per_stream": tokens, "tokens": received, "seconds": elapsed,
            "tokens_per_s": received / elapsed, "sse_events": events, "tokens_per_event": received / max(1, events),
            "complete": received == streams * tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--step-ms", type=float, default=5.0, help="the mock engine's constant step time")
    parser.add_argument("--gpus", type=int, default=2, help="mock workers (colocated)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        profile = constant_profile(args.step_ms / 1e3, Path(tmp) / "constant.json")
        per_worker = -(-args.streams // args.gpus)
        server = ServerProcess("--model", "tiny", "--engine", "mock", "--model-profile", str(profile), "--gpus",
                               str(args.gpus), "--mode", "colocated", "--max-num-seqs", str(per_worker))
        try:
            result = asyncio.run(run(server.url, args.streams, args.tokens))
        finally:
            server.stop()
    result.update(step_ms=args.step_ms, workers=args.gpus)
    print(json.dumps(result, indent=2))
    print()
    print("| streams | tokens | seconds | tokens/s | SSE events | tokens/event |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['streams']} | {result['tokens']} | {result['seconds']:.2f} | {result['tokens_per_s']:.0f} | "
          f"{result['sse_events']} | {result['tokens_per_event']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
