"""The live DOPD policy on a real server (mock engine) under a load that shifts between phases.

The server is the paper's scale: Llama-3-70B on 8 H100s as 4 workers of tp 2 (`--gpus 8 --tp 2`),
started 2P:2D, the policy closing an interval every second. The workload, at a constant 7 req/s:

    decode-heavy  (64-token prompts, 400 output tokens)  PHASE_S seconds
    prefill-heavy (3000-token prompts, 8 output tokens)  PHASE_S seconds
    decode-heavy  again                                  PHASE_S seconds

Why these numbers matter at the mock's speed (`get_profile("llama3-70b", "h100", tp=2)`): a
3000-token prefill takes 0.35 s, so 7 prompts/s keep 2.5 prefill workers busy; a decode step over
~120 sequences takes ~47 ms, so a 400-token request decodes for ~19 s and 7 req/s keep ~130
sequences of ~260 tokens ≈ 34k KV tokens live, where one worker holds 26k: the decode-heavy phase
needs two decode workers (the policy's own split at this load says 1.5 D, and 2.5 P for the other).

What it must show (issue 4): a move toward more prefill (a worker's move *to* prefill) decided within
two intervals of the shift to prefill-heavy, and a move toward more decode within two intervals of
the shift back (each allowing the policy tick on which the controller closes an interval), on the
controller's clock (mapped from the client's through `GET /v1/cluster` →
`time`); no request fails; every pool is whole at the end. On failure the message carries the role
log and the policy's view (forecast, target, corrections) sampled through the run.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from dopd.controller import POLICY_TICK
from dopd.workload import WorkloadRequest
from scripts.bench import run_workload, token_prompt
from serverproc import ServerProcess

INTERVAL = 1.0
RATE = 7.0
PHASE_S = 15.0
DECODE_HEAVY = (64, 400)
PREFILL_HEAVY = (3000, 8)
SERVER_ARGS = ("--model", "tiny", "--engine", "mock", "--model-profile", "llama3-70b", "--hardware", "h100",
               "--gpus", "8", "--tp", "2", "--mode", "dopd", "--pd-ratio", "2:2",
               "--policy-interval", str(INTERVAL))


def phases() -> list[WorkloadRequest]:
    reqs = []
    for k, (input_len, output_len) in enumerate((DECODE_HEAVY, PREFILL_HEAVY, DECODE_HEAVY)):
        n = int(PHASE_S * RATE)
        reqs += [WorkloadRequest(k * PHASE_S + i / RATE, input_len, output_len) for i in range(n)]
    return reqs


class Recorder(threading.Thread):
    """Samples the cluster snapshot (roles, queues, the policy's view) until stopped."""

    def __init__(self, server: ServerProcess, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                s = self.server.get("/v1/cluster")
            except OSError:
                break
            self.samples.append({
                "t": round(s["time"], 2),
                "roles": "".join((w["target_role"] or w["role"])[0].upper() for w in s["workers"]),
                "queues": {k: v for k, v in s["queues"].items() if v},
                "prefill_tokens": [w["pending_prefill_tokens"] for w in s["workers"]],
                "running": [w["num_running"] for w in s["workers"]],
                "kv_used": [round(1 - w["kv_blocks_free"] / w["kv_blocks_total"], 2) for w in s["workers"]],
                "policy": _brief(s["policy"]),
            })
            self.done.wait(self.every)


def _brief(policy: dict | None) -> dict | None:
    if not policy:
        return policy
    f, t = policy.get("forecast"), policy.get("target")
    return {"forecast": f and {k: round(v, 1) for k, v in f.items()},
            "target": t and f"{t['prefill']}P:{t['decode']}D+{t['idle']}I",
            "corr": {k: round(v, 2) for k, v in policy.get("corrections", {}).items()}}


def controller_offset(server: ServerProcess) -> float:
    """controller clock − client perf_counter, from the quickest of a few round trips."""
    best = None
    for _ in range(5):
        start = time.perf_counter()
        ctl = server.get("/v1/cluster")["time"]
        end = time.perf_counter()
        if best is None or end - start < best[0]:
            best = (end - start, ctl - (start + end) / 2)
    return best[1]


def adds(move: dict, role: str) -> bool:
    """A move that gives `role` one more worker."""
    return move["to"] == role and move["from"] != role


def story(boundaries: list[float], log: list[dict], samples: list[dict]) -> str:
    """The role log and the sampled timeline, one line each, for a failure message."""
    lines = ["phase boundaries (controller clock): " + ", ".join(f"{b:.2f}" for b in boundaries), "role log:"]
    for m in log:
        lines.append(f"  {m['started_at']:7.2f} → {m.get('finished_at', float('nan')):7.2f}  worker {m['worker']} "
                     f"{m['from']} → {m['to']}  migrated {m.get('num_migrated', '-')}  ({m['reason']})")
    lines.append("timeline: t, roles (P/D/I, target role while moving), queues, pending prefill tokens, running, "
                 "KV used, policy")
    lines += [f"  {x['t']:6.2f} {x['roles']} {x['queues']} {x['prefill_tokens']} {x['running']} {x['kv_used']} "
              f"{json.dumps(x['policy'])}" for x in samples]
    return "\n".join(lines)


@pytest.mark.slow
def test_dopd_follows_a_shifting_load():
    server = ServerProcess(*SERVER_ARGS)
    recorder = Recorder(server)
    made: list[float] = []

    def prompt(req: WorkloadRequest, i: int) -> list[int]:
        made.append(time.perf_counter())  # the bodies are made just before run_workload's clock starts
        return token_prompt(req, i)

    try:
        reqs = phases()
        offset = controller_offset(server)
        recorder.start()
        records, _ = asyncio.run(run_workload(server.url, "tiny", reqs, prompts=prompt, request_timeout=120))
        snap = server.wait_idle(30)
    finally:
        recorder.done.set()
        recorder.join(5)
        code = server.stop()
    start = made[-1] + offset
    boundaries = [start + k * PHASE_S for k in range(4)]
    log = snap["role_changes"] + snap["moves_in_progress"]
    failed = [r for r in records if not r.success or r.output_len != reqs[int(r.request_id)].output_len]
    assert not failed, (f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0].error!r}\n"
                        + story(boundaries, log, recorder.samples))
    assert code == 0, server.logs()
    for w in snap["workers"]:
        assert w["kv_blocks_free"] == w["kv_blocks_total"], snap["workers"]
    # Two intervals, and the policy tick that closes the second: the controller decides on ticks.
    window = 2 * INTERVAL + POLICY_TICK
    toward_prefill = [m for m in log if adds(m, "prefill") and 0 <= m["started_at"] - boundaries[1] <= window]
    toward_decode = [m for m in log if adds(m, "decode") and 0 <= m["started_at"] - boundaries[2] <= window]
    missing = [what for what, moves in (("toward prefill within %g s of the shift to prefill-heavy" % window,
                                          toward_prefill),
                                         ("toward decode within %g s of the shift back to decode-heavy" % window,
                                          toward_decode)) if not moves]
    assert not missing, "no move " + " and no move ".join(missing) + "\n" + story(boundaries, log, recorder.samples)
