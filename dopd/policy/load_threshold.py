"""Baseline: Dynamo's load-based planner (DYN-LOAD), on our fixed pool of workers.

Every interval, ±1 worker per role at most, from thresholds on what the workers report:
- decode: mean KV usage of the decode workers above 0.9 adds one, below 0.5 removes one, but not
  within a grace period of 3 intervals after one was added;
- prefill: queued prompts per prefill worker above 5 — and a linear trend that keeps it above for
  the next 3 intervals — adds one, below 0.2 removes one.
Workers are added from the idle pool and removed to it (Dynamo starts and stops replicas on free
GPUs; it never turns a prefill worker into a decode worker).
"""

from __future__ import annotations

import numpy as np

from dopd.messages import Role
from dopd.policy.base import Decision, PolicyConfig, Snapshot, plan_moves

KV_UP, KV_DOWN = 0.9, 0.5
QUEUE_UP, QUEUE_DOWN = 5.0, 0.2
GRACE_INTERVALS = 3
TREND_INTERVALS = 3


class LoadThresholdPolicy:
    name = "load_threshold"

    def __init__(self, cfg: PolicyConfig, num_workers: int) -> None:
        self.cfg, self.num_workers = cfg, num_workers
        self.queue_history: list[float] = []
        self.intervals_since_decode_added = GRACE_INTERVALS
        self.last = ""

    def decide(self, snap: Snapshot) -> list[Decision]:
        if snap.interval is None:
            return []
        num_p, num_d, idle = snap.count(Role.PREFILL), snap.count(Role.DECODE), snap.count(Role.IDLE)
        decoders = [w for w in snap.workers if w.alive and w.role == Role.DECODE]
        kv = float(np.mean([w.kv_usage for w in decoders])) if decoders else 0.0
        queue = snap.queued_prefill_requests / max(1, num_p)
        self.queue_history = (self.queue_history + [queue])[-10:]
        self.intervals_since_decode_added += 1
        if snap.moving:
            return []
        p, d = num_p, num_d
        if kv > KV_UP and idle:
            d, idle = d + 1, idle - 1
            self.intervals_since_decode_added = 0
        elif kv < KV_DOWN and d > 1 and self.intervals_since_decode_added >= GRACE_INTERVALS:
            d -= 1
        if queue > QUEUE_UP and self._stays_high() and idle:
            p += 1
        elif queue < QUEUE_DOWN and p > 1:
            p -= 1
        if (p, d) == (num_p, num_d):
            return []
        self.last = f"load: decode KV {kv:.0%}, {queue:.1f} queued per prefill worker -> {p}P:{d}D"
        return plan_moves(snap, p, d, self.last)

    def _stays_high(self) -> bool:
        """Dynamo's trend check: a linear fit of the queue keeps it above the threshold ahead."""
        h = self.queue_history
        if len(h) < 2:
            return True
        slope, intercept = np.polyfit(np.arange(len(h)), h, 1)
        return slope * (len(h) - 1 + TREND_INTERVALS) + intercept > QUEUE_UP

    def describe(self) -> dict:
        return {"name": self.name, "last": self.last}
