"""The DOPD policy: forecast the load, compute the optimal P/D split, move workers to it.

Each monitoring interval:
1. observe the interval (rate, ISL mean and variance, OSL) and forecast the next one (ARIMA);
2. update the correction factors (measured / cost-model TTFT, and decode workers' step times),
   ignoring intervals in which a worker had just changed role — its first steps would skew the
   estimate (Dynamo #12430);
3. compute the split for the forecast (`ratio.optimal_split`) and move toward it — at once when it
   adds capacity; when it takes capacity away, only if the split at 25% more load takes it away
   too (a dead band), and after it was asked for twice running unless the shrinking role plainly
   can absorb its current load (consolidation-aware scale-down: no 2↔1 flapping).
Between intervals, an emergency path acts at once when the prefill queue holds more work than a
share of the TTFT SLO, or a decode worker's KV is nearly full: as many parked workers as the
pressure asks for wake up, or, with none parked, one worker moves from the other role.
No decision is taken while a move is still under way.
"""

from __future__ import annotations

import math

from dopd.messages import Role
from dopd.metrics import SLO
from dopd.policy.base import Decision, PolicyConfig, Snapshot, plan_moves
from dopd.policy.forecast import CorrectionFactor, LoadForecast
from dopd.policy.ratio import Split, decode_concurrency, expected_prefill_cost, optimal_split
from dopd.policy.resources import decode_step_seconds
from dopd.policy.routing import WorkerView
from dopd.sim.costmodel import CostModel, attn_work

EMERGENCY_COOLDOWN_S = 2.0
CONSOLIDATION_MARGIN = 0.8  # a shrinking role must fit its current load in this share of what remains
CLEAR_MARGIN = 0.5  # ... and if it fits in this share, the shrink needs no second confirmation
SCALE_DOWN_BAND = 0.25  # a role shrinks only if it would at this much more load as well


class DopdPolicy:
    name = "dopd"

    def __init__(self, cfg: PolicyConfig, cost: CostModel, slo: SLO, num_workers: int) -> None:
        self.cfg, self.cost, self.slo, self.num_workers = cfg, cost, slo, num_workers
        self.forecast = LoadForecast(cfg.forecast_window, method=cfg.forecast_method)
        self.prefill_correction = CorrectionFactor(min_value=0.5, max_value=3.0)
        self.decode_correction = CorrectionFactor(min_value=0.5, max_value=3.0)
        self.split: Split | None = None
        self.asked: tuple[int, int] | None = None  # a shrinking target seen once, waiting to be confirmed
        self.last_emergency = -math.inf
        self.last_time: float | None = None
        self.gpu_seconds = 0.0
        self.prediction = None

    # ---- the decision -------------------------------------------------------------------------

    def decide(self, snap: Snapshot) -> list[Decision]:
        self._account(snap)
        if snap.interval is not None:
            self._observe(snap)
        if snap.moving:
            return []
        urgent = self._emergency(snap)
        if urgent or snap.interval is None:
            return urgent
        return self._proactive(snap)

    def _observe(self, snap: Snapshot) -> None:
        s = snap.interval
        self.forecast.observe(s.num_arrivals, s.end - s.start, s.mean_input_len, s.var_input_len,
                              s.mean_output_len)
        self.prediction = self.forecast.predict()
        if any(snap.now - t < self.cfg.cooldown_intervals * self.cfg.interval for t in snap.last_moved.values()):
            return  # samples from a worker that just changed role would skew the corrections
        if s.ttft_p50 is not None and s.queued_prefill_requests <= snap.count(Role.PREFILL) and s.mean_input_len:
            # TTFT of an interval without a prefill queue is service time, not waiting
            self.prefill_correction.update(s.ttft_p50, expected_prefill_cost(self.cost, s.mean_input_len,
                                                                             s.var_input_len))
        if steps := decode_step_seconds(s, self.cost):
            self.decode_correction.update(*steps)

    def _target(self, snap: Snapshot, load: float = 1.0) -> Split:
        p = self.prediction
        live = sum(1 for w in snap.workers if w.alive)
        osl = p.mean_output_len or 1.0
        return optimal_split(self.cost, p.rate * load, p.mean_input_len, p.var_input_len, osl, self.slo.tpot, live,
                             park=self.cfg.park_idle, headroom=self.cfg.headroom,
                             prefill_correction=self.prefill_correction.value,
                             decode_correction=self.decode_correction.value)

    def _proactive(self, snap: Snapshot) -> list[Decision]:
        if self.prediction is None:
            return []
        split = self.split = self._target(snap)
        current = (snap.count(Role.PREFILL), snap.count(Role.DECODE))
        target = (split.num_prefill, split.num_decode)
        if target[0] < current[0] or target[1] < current[1]:
            # Hysteresis: a role gives a worker up only if it would with SCALE_DOWN_BAND more load too,
            # so that a forecast hovering at a boundary does not flip a worker every interval.
            firm = self._target(snap, load=1 + SCALE_DOWN_BAND)
            target = tuple(want if want >= have else max(want, min(have, keep))
                           for want, have, keep in zip(target, current, (firm.num_prefill, firm.num_decode)))
        if target == current:
            self.asked = None
            return []
        grows = target[0] >= current[0] and target[1] >= current[1]
        # A role that shrinks must be able to hold what it has with the workers it keeps; unless it
        # plainly can (under half its limits), the same target must be asked for twice running.
        if not grows and not self._can_shrink(snap, target, CLEAR_MARGIN):
            confirmed = self.asked == target
            self.asked = target
            if not confirmed or not self._can_shrink(snap, target, CONSOLIDATION_MARGIN):
                return []
        self.asked = None
        p = self.prediction
        reason = (f"forecast {p.rate:.2f} req/s, ISL {p.mean_input_len:.0f}±{math.sqrt(p.var_input_len):.0f}, "
                  f"OSL {p.mean_output_len:.0f}: {split.describe()}")
        return plan_moves(snap, target[0], target[1], reason)

    def _can_shrink(self, snap: Snapshot, target: tuple[int, int], margin: float) -> bool:
        """Consolidation check: a role that loses workers must keep what it has now — its queue and
        its running and waiting requests — within `margin` of its limits with the workers it keeps
        (so a scale-down is never undone by the next emergency: no 2↔1 flapping)."""
        if target[1] < snap.count(Role.DECODE) and self._decode_pressure(snap, target[1]) > margin:
            return False
        budget = self.cfg.emergency_queue * self.slo.ttft
        if target[0] < snap.count(Role.PREFILL) and self._queued_prefill_seconds(snap, target[0]) > margin * budget:
            return False
        return True

    # ---- the emergency path -------------------------------------------------------------------

    def _queued_prefill_seconds(self, snap: Snapshot, num_prefill: int) -> float:
        """How long the queued prompts would take the prefill workers (seconds each)."""
        per_token = self.cost.prefill_b * self.prefill_correction.value
        return snap.queued_prefill_tokens * per_token / max(1, num_prefill)

    def _emergency(self, snap: Snapshot) -> list[Decision]:
        """Workers, at once, to the role that is past its limit: parked ones (as many as it needs),
        else one from the other role if that can spare it.

        Prefill pressure: the queued prompt work per prefill worker as a share of the emergency budget
        (a share of the TTFT SLO). Decode pressure: the requests decoding or waiting to decode per
        decode worker as a share of what one holds within the TPOT SLO, or its KV occupancy as a
        share of the emergency threshold. A worker of the other role moves only if that role stays
        under its limit with one worker fewer.
        """
        if snap.now - self.last_emergency < EMERGENCY_COOLDOWN_S:
            return []
        num_p, num_d = snap.count(Role.PREFILL), snap.count(Role.DECODE)
        idle = snap.count(Role.IDLE)
        budget = self.cfg.emergency_queue * self.slo.ttft
        prefill = self._queued_prefill_seconds(snap, num_p) / budget
        decode = self._decode_pressure(snap, num_d)
        target = None
        # Prefilled requests waiting for decode room hold their prefill workers' KV: then decode is
        # the bottleneck, whatever queue builds up behind it on the prefill side.
        decode_bound = snap.handoff_queue > num_d and decode > 1
        if prefill > 1 and prefill >= decode and not decode_bound and \
                (idle or num_d > 1 and self._decode_pressure(snap, num_d - 1) < 1):
            target = (num_p + _wanted(num_p, prefill, idle), num_d) if idle else (num_p + 1, num_d - 1)
        elif decode > 1 and (idle or num_p > 1 and (decode_bound or
                                                    self._queued_prefill_seconds(snap, num_p - 1) < budget)):
            target = (num_p, num_d + _wanted(num_d, decode, idle)) if idle else (num_p - 1, num_d + 1)
        if target is None:
            return []
        self.last_emergency = snap.now
        self.asked = None
        reason = (f"emergency: prefill at {prefill:.0%} of its queue budget, decode at {decode:.0%} of its "
                  f"capacity, {snap.handoff_queue} handoffs waiting")
        return plan_moves(snap, target[0], target[1], reason)

    def _decode_pressure(self, snap: Snapshot, num_decode: int) -> float:
        """Decode load as a share of what `num_decode` workers hold within the TPOT SLO and the KV limit.

        Capacity is judged on what is there now: the mean context of the requests decoding (from
        their KV), not the forecast lengths, which may belong to the next phase already."""
        decoders = [w for w in snap.workers if w.alive and w.role == Role.DECODE]
        if num_decode < 1:
            return float("inf")
        requests = sum(w.num_running + w.num_waiting + w.num_incoming for w in decoders) + snap.handoff_queue
        used = sum(w.kv_blocks_total - w.kv_blocks_free for w in decoders)
        total = sum(w.kv_blocks_total for w in decoders) / max(1, len(decoders)) * num_decode
        context = used * snap.block_size / max(1, requests)
        ccd = decode_concurrency(self.cost.scaled(decode=self.decode_correction.value), max(1.0, context), 0.0,
                                 self.slo.tpot)
        return max(requests / (num_decode * ccd), used / (self.cfg.emergency_kv * total) if total else 0.0)

    def admits(self, worker: WorkerView, blocks: int, block_size: int, prefill_tokens: int = 0) -> bool:
        """Routing's admission check: may this decode worker take a request of `blocks` KV blocks?

        Yes while its next decode step, with the request added, is predicted to stay within the TPOT
        SLO (measured by the KV it holds, not by a request count: contexts differ), and always when
        it runs nothing (a lone request must go somewhere). A worker that would prefill the request
        itself (`prefill_tokens`, an ultra-short prompt) must also keep the step that does so within
        the SLO, idle or not: its running requests, and those handed to it meanwhile, must not feel
        it. What is short enough is thus a question of the hardware — on an H200 a 300-token
        prefill hides in a decode step, on a CPU none does."""
        batch = worker.num_running + worker.num_incoming
        if batch == 0 and not prefill_tokens:
            return True
        held = (worker.kv_blocks_total - worker.kv_blocks_free) * block_size
        cost = self.cost.scaled(self.prefill_correction.value, self.decode_correction.value)
        step = cost.decode_time(batch + 1, held + blocks * block_size)
        if prefill_tokens:
            # Even on an idle worker: every request handed to it while it prefills waits that step
            # out (on the CPU, 400-token prompts prefilled on the decode worker put ~1 s between
            # other requests' first two tokens). Prompts placed there and not yet stepped share it.
            tokens = prefill_tokens + worker.pending_prefill_tokens
            step = max(step, cost.step_time(tokens, attn_work(tokens), batch, held))
        return step <= self.slo.tpot

    def long_prompt_len(self) -> float | None:
        """Prompts at or above the forecast mean input length go to prefill at once (§5)."""
        p = self.prediction
        return p.mean_input_len if p is not None and p.mean_input_len > 0 else None

    # ---- reporting ----------------------------------------------------------------------------

    def _account(self, snap: Snapshot) -> None:
        """GPU-seconds in use: the paper's claim is the SLOs met with fewer resources."""
        busy = sum(1 for w in snap.workers if w.alive and w.role != Role.IDLE)
        if self.last_time is not None:
            self.gpu_seconds += busy * self.cost.num_gpus * (snap.now - self.last_time)
        self.last_time = snap.now

    def describe(self) -> dict:
        p = self.prediction
        s = self.split
        return {
            "name": self.name,
            "forecast": None if p is None else {"rate": p.rate, "mean_input_len": p.mean_input_len,
                                                "var_input_len": p.var_input_len,
                                                "mean_output_len": p.mean_output_len},
            "target": None if s is None else {"prefill": s.num_prefill, "decode": s.num_decode,
                                              "idle": s.num_idle, "ccd": s.ccd, "ratio": s.ratio},
            "corrections": {"prefill": self.prefill_correction.value, "decode": self.decode_correction.value},
            "gpu_seconds": self.gpu_seconds,
        }


def _wanted(num: int, pressure: float, idle: int) -> int:
    """Idle workers to add to a role of `num` workers at `pressure` (its load over its limit, which
    scales as 1/workers) to bring it back under its limit: waking a parked worker costs nothing,
    so a burst is met in one step rather than one worker per cooldown."""
    return max(1, min(idle, math.ceil(num * pressure) - num))
