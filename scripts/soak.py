"""Soak: thousands of requests through a live server while faults are injected, then an accounting.

While the requests run: clients hang up on some streams after a random number of chunks, workers are
moved between roles at random through the admin route, and one worker is killed with SIGKILL midway.
Afterwards every request must have ended in output or an explicit error within a timeout (none
hung, none cut off by the server without a word, no token dropped or duplicated: the mock engine's
tokens are a known function of the request id and position, so every text is checked), every pool
must be whole again, no request left on the controller, and the server's RSS at the end within a
bound of its RSS after warm-up. Prints the counts as JSON and as a table; exits 1 if anything was
lost or leaked.

    python scripts/soak.py [--requests 2000] [--concurrency 32] [--duration 600] [--seed 0] [-- SERVER ARGS]

SERVER ARGS replace the default `--model tiny --engine mock --gpus 3 --mode static --pd-ratio 1:2`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py
sys.path.insert(0, str(ROOT / "tests"))

from dopd.config import DEFAULT_MODEL  # noqa: E402
from dopd.embedded import resolve_model  # noqa: E402
from dopd.workers.loader import load_tokenizer  # noqa: E402
from dopd.workers.mock import synthetic_token  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

DEFAULT_SERVER = ["--model", "tiny", "--engine", "mock", "--gpus", "3", "--mode", "static", "--pd-ratio", "1:2"]
ROLES = ("prefill", "decode", "mixed", "idle")


@dataclass(frozen=True, slots=True)
class Spec:
    index: int
    chat: bool
    prompt: list[int] | str
    max_tokens: int
    stream: bool
    cut_after: int | None  # chunks to read before hanging up (None: read to the end)


@dataclass(slots=True)
class Outcome:
    state: str  # completed | disconnected | errored | lost
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    role_moves: int = 0
    role_moves_refused: int = 0
    kills: list[dict] = field(default_factory=list)
    rss_warm_kib: int | None = None
    rss_peak_kib: int = 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_specs(n: int, rng: random.Random) -> list[Spec]:
    specs = []
    for i in range(n):
        chat = rng.random() < 0.1
        n_prompt = int(min(600, rng.expovariate(1 / 60))) + 1
        prompt = (f"soak {i} " + " ".join(rng.choice("alpha beta gamma delta".split()) for _ in range(n_prompt // 4))
                  if chat else [rng.randrange(300, 2300) for _ in range(n_prompt)])
        stream = rng.random() < 0.9
        cut = rng.choice([0, 1, 2, 5, 10, 30]) if stream and rng.random() < 0.2 else None
        specs.append(Spec(i, chat, prompt, rng.randint(1, 150), stream, cut))
    return specs


class Checker:
    """What the mock engine must have produced for a request: its tokens are a fixed function of the
    request id and the position (dopd.workers.mock.synthetic_token)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)

    def text(self, request_id: str, prompt_len: int, num_tokens: int) -> str:
        ids = [synthetic_token(request_id, prompt_len + i, self.vocab) for i in range(num_tokens)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def reason_of(message: str) -> str:
    """An error message with its numbers taken out, to count alike errors together."""
    return re.sub(r"\d+(\.\d+)?", "N", message)[:100]


async def run_one(session: aiohttp.ClientSession, url: str, spec: Spec, checker: Checker | None,
                  timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        outcome = await asyncio.wait_for(_request(session, url, spec, checker), timeout)
    except asyncio.TimeoutError:
        outcome = Outcome("lost", f"no end within {timeout:.0f} s (hung)")
    except (aiohttp.ClientError, ConnectionError) as e:
        outcome = Outcome("lost", f"connection failed: {type(e).__name__}")
    outcome.seconds = time.monotonic() - started
    return outcome


async def _request(session, url: str, spec: Spec, checker: Checker | None) -> Outcome:
    if spec.chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": spec.prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": spec.prompt}
    body.update(max_tokens=spec.max_tokens, temperature=0, ignore_eos=True, stream=spec.stream)
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            try:
                error = (await resp.json(content_type=None))["error"]
                return Outcome("errored", f"HTTP {resp.status}: {reason_of(error['message'])}")
            except (ValueError, KeyError, TypeError):
                return Outcome("lost", f"HTTP {resp.status} without a JSON error")
        if not spec.stream:
            reply = await resp.json()
            choice = reply["choices"][0]
            text = choice["message"]["content"] if spec.chat else choice["text"]
            return _verify(checker, reply["id"], reply["usage"]["prompt_tokens"], spec, text)
        request_id, text, chunks, usage, error = None, "", 0, None, None
        if spec.cut_after == 0:
            return Outcome("disconnected")  # hang up before the first chunk
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                if error is not None:
                    return Outcome("errored", f"stream: {reason_of(error['message'])}")
                prompt_len = usage["prompt_tokens"] if usage else None
                if usage is None or usage["completion_tokens"] != spec.max_tokens:
                    return Outcome("lost", f"stream ended with {usage} for {spec.max_tokens} tokens")
                return _verify(checker, request_id, prompt_len, spec, text)
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                continue
            request_id = request_id or event.get("id")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or "" if spec.chat else choice.get("text") or ""
            if event.get("choices"):
                chunks += 1
                if spec.cut_after is not None and chunks >= spec.cut_after:
                    if not spec.chat and checker is not None:  # what came so far must be a prefix
                        expected = checker.text(request_id, len(spec.prompt), spec.max_tokens)
                        if not expected.startswith(text):
                            return Outcome("lost", "corrupted: a cut stream's text is not a prefix of its tokens")
                    return Outcome("disconnected")
        return Outcome("lost", "stream ended without [DONE]")


def _verify(checker: Checker | None, request_id: str, prompt_len: int | None, spec: Spec, text: str) -> Outcome:
    if checker is not None and prompt_len is not None:
        expected = checker.text(request_id, prompt_len, spec.max_tokens)
        if text != expected:
            return Outcome("lost", "corrupted: tokens dropped, duplicated or out of order")
    return Outcome("completed")


async def chaos(session, url: str, rng: random.Random, tally: Tally, done: asyncio.Event,
                kill_now: asyncio.Event, pid: int) -> None:
    """Random role moves through the admin route; one SIGKILL of a worker when told to."""
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), rng.uniform(0.3, 1.5))
            break
        except asyncio.TimeoutError:
            pass
        tally.rss_peak_kib = max(tally.rss_peak_kib, rss_kib(pid))
        async with session.get(url + "/v1/cluster") as r:
            snap = await r.json()
        workers = [w for w in snap["workers"] if w["state"] != "dead" and w["state"] != "starting"]
        if kill_now.is_set() and not tally.kills:
            victim = rng.choice(workers)
            os.kill(victim["pid"], signal.SIGKILL)
            tally.kills.append({"worker": victim["id"], "pid": victim["pid"], "role": victim["role"],
                                "restarts_before": victim["restarts"], "at_s": snap["time"]})
            continue
        ids = rng.sample([w["id"] for w in workers], k=min(len(workers), rng.choice([1, 1, 2])))
        roles = {str(i): rng.choices(ROLES, weights=(4, 4, 1, 1))[0] for i in ids}
        body = {"roles": roles, "reason": "soak", "migrate": rng.choice([True, False, None])}
        async with session.post(url + "/v1/cluster/roles", json=body) as r:
            if r.status == 200:
                tally.role_moves += len((await r.json())["moves"])
            else:  # the split asked for cannot serve (no prefill or no decode left): refused, 400
                tally.role_moves_refused += 1


async def soak(url: str, pid: int, args, checker: Checker | None) -> tuple[Tally, float]:
    rng = random.Random(args.seed)
    specs = make_specs(args.requests, rng)
    tally = Tally()
    queue = collections.deque(specs)
    done, kill_now = asyncio.Event(), asyncio.Event()
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            while queue and time.monotonic() - started < args.duration:
                spec = queue.popleft()
                tally.outcomes.append(await run_one(session, url, spec, checker, args.request_timeout))
                finished = len(tally.outcomes)
                if finished == args.warmup:
                    tally.rss_warm_kib = rss_kib(pid)
                if finished >= args.requests // 2 or time.monotonic() - started > args.duration / 2:
                    kill_now.set()

        chaos_task = asyncio.create_task(chaos(session, url, random.Random(args.seed + 1), tally, done, kill_now,
                                               pid))
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        done.set()
        await chaos_task
    return tally, time.monotonic() - started


def settle(server: ServerProcess, timeout: float) -> dict:
    """The snapshot once nothing is in flight, every pool is whole and every worker serves (or at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = server.get("/v1/cluster")
        settled = snap["num_requests"] == 0 and all(
            w["state"] == "serving" and w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
        if settled or time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


def report(args, tally: Tally, elapsed: float, snap: dict, rss_end: int) -> tuple[dict, bool]:
    counts = collections.Counter(o.state for o in tally.outcomes)
    reasons = {state: dict(collections.Counter(o.reason for o in tally.outcomes if o.state == state).most_common())
               for state in ("errored", "lost")}
    leaked = sum(w["kv_blocks_total"] - w["kv_blocks_free"] for w in snap["workers"])
    killed_back = all(snap["workers"][k["worker"]]["restarts"] > k["restarts_before"]
                      and snap["workers"][k["worker"]]["state"] == "serving" for k in tally.kills)
    warm = tally.rss_warm_kib or rss_end
    bound = args.rss_bound_mib * 1024
    result = {
        "requests": args.requests, "started": len(tally.outcomes), "not_started": args.requests - len(tally.outcomes),
        "completed": counts["completed"], "disconnected_by_client": counts["disconnected"],
        "errored": counts["errored"], "errors": reasons["errored"],
        "lost": counts["lost"], "lost_reasons": reasons["lost"],
        "faults": {"role_moves": tally.role_moves, "role_moves_refused": tally.role_moves_refused,
                   "kills": len(tally.kills), "killed": tally.kills, "killed_workers_back": killed_back},
        "requests_left_on_server": snap["num_requests"], "blocks_leaked": leaked,
        "workers": [{k: w[k] for k in ("id", "role", "state", "restarts", "kv_blocks_free", "kv_blocks_total")}
                    for w in snap["workers"]],
        "rss_kib": {"after_warmup": warm, "peak": max(tally.rss_peak_kib, rss_end), "end": rss_end,
                    "growth": rss_end - warm, "bound": int(bound)},
        "seconds": round(elapsed, 1), "requests_per_s": round(len(tally.outcomes) / elapsed, 1),
        "seed": args.seed, "concurrency": args.concurrency,
    }
    ok = (counts["lost"] == 0 and leaked == 0 and snap["num_requests"] == 0 and killed_back
          and rss_end - warm <= bound and len(tally.kills) == 1)
    result["verdict"] = "pass" if ok else "FAIL"
    return result, ok


def table(r: dict) -> str:
    rows = [
        ("requests (started / asked)", f"{r['started']} / {r['requests']}"),
        ("completed", r["completed"]), ("disconnected by the client", r["disconnected_by_client"]),
        ("errored (explicit)", r["errored"]),
        *((f"  {why}", n) for why, n in r["errors"].items()),
        ("role moves (refused)", f"{r['faults']['role_moves']} ({r['faults']['role_moves_refused']})"),
        ("workers killed (back serving)", f"{r['faults']['kills']} ({r['faults']['killed_workers_back']})"),
        ("requests lost", r["lost"]), *((f"  {why}", n) for why, n in r["lost_reasons"].items()),
        ("requests left on the server", r["requests_left_on_server"]), ("blocks leaked", r["blocks_leaked"]),
        ("RSS after warm-up / end / peak (MiB)", " / ".join(f"{r['rss_kib'][k] / 1024:.1f}"
                                                          for k in ("after_warmup", "end", "peak"))),
        ("RSS growth (bound) (MiB)", f"{r['rss_kib']['growth'] / 1024:+.1f} ({r['rss_kib']['bound'] / 1024:.1f})"),
        ("seconds (requests/s)", f"{r['seconds']} ({r['requests_per_s']})"), ("verdict", r["verdict"]),
    ]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(["| what | count |", "|---|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = DEFAULT_SERVER
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600.0, help="stop starting requests after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the RSS baseline")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="a request not ended by then hung")
    parser.add_argument("--rss-bound-mib", type=float, default=24.0, help="how much RSS may grow after warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    args.warmup = min(args.warmup, max(1, args.requests // 4))

    checker = None
    if _flag(server_args, "--engine") == "mock":  # its tokens are known: check every text
        checker = Checker(load_tokenizer(resolve_model(_flag(server_args, "--model") or DEFAULT_MODEL)))
    server = ServerProcess(*server_args, "--log-level", "warning")
    try:
        tally, elapsed = asyncio.run(soak(server.url, server.proc.pid, args, checker))
        snap = settle(server, 60)
        rss_end = rss_kib(server.proc.pid)
    finally:
        code = server.stop()
    result, ok = report(args, tally, elapsed, snap, rss_end)
    result["server_exit_code"] = code
    result["tokens_checked"] = checker is not None
    print(json.dumps(result, indent=2))
    print()
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
