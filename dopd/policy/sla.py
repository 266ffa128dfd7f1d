"""Baseline: Dynamo's SLA planner (DYN-SLA): forecast the load, size each role from profiled
throughput per worker at its SLO — each on its own, without DOPD's ratio reasoning.

- prefill: a worker prefills `ISL / TTFT(ISL)` tokens a second at the mean input length, so
  N_P = ⌈λ·ISL / that⌉ (the mean only: no variance term);
- decode: the largest batch whose step meets the TPOT SLO gives tokens a second per worker, so
  N_D = ⌈λ·OSL / that⌉.
Forecasts and correction factors as DOPD's; clamped to the pool in proportion; no emergency path,
no hysteresis, no length-aware routing. Applied every interval, not while a move is under way.
"""

from __future__ import annotations

from dopd.messages import Role
from dopd.metrics import SLO
from dopd.policy.base import Decision, PolicyConfig, Snapshot, plan_moves
from dopd.policy.forecast import CorrectionFactor, LoadForecast
from dopd.policy.ratio import clamp, decode_concurrency, mean_context
from dopd.policy.resources import decode_step_seconds
from dopd.sim.costmodel import CostModel


class SlaPolicy:
    name = "sla"

    def __init__(self, cfg: PolicyConfig, cost: CostModel, slo: SLO, num_workers: int) -> None:
        self.cfg, self.cost, self.slo, self.num_workers = cfg, cost, slo, num_workers
        self.forecast = LoadForecast(cfg.forecast_window, method=cfg.forecast_method)
        self.prefill_correction = CorrectionFactor(min_value=0.5, max_value=3.0)
        self.decode_correction = CorrectionFactor(min_value=0.5, max_value=3.0)
        self.target: tuple[int, int, int] | None = None

    def decide(self, snap: Snapshot) -> list[Decision]:
        s = snap.interval
        if s is None:
            return []
        self.forecast.observe(s.num_arrivals, s.end - s.start, s.mean_input_len, s.var_input_len, s.mean_output_len)
        p = self.forecast.predict()
        isl, osl = max(1.0, p.mean_input_len), max(1.0, p.mean_output_len)
        if s.ttft_p50 is not None and s.mean_input_len:
            self.prefill_correction.update(s.ttft_p50, self.cost.prefill_time([int(s.mean_input_len)]))
        if steps := decode_step_seconds(s, self.cost):
            self.decode_correction.update(*steps)
        if snap.moving:
            return []
        prefill_tps = isl / (self.cost.prefill_time([int(isl)]) * self.prefill_correction.value)
        decode_cost = self.cost.scaled(decode=self.decode_correction.value)
        batch = decode_concurrency(decode_cost, isl, osl, self.slo.tpot)
        decode_tps = batch / decode_cost.decode_time(batch, int(batch * mean_context(isl, osl)))
        live = sum(1 for w in snap.workers if w.alive)
        need_p, need_d = p.rate * isl / prefill_tps, p.rate * osl / decode_tps
        self.target = clamp(need_p, need_d, live, park=True)
        num_p, num_d, _ = self.target
        if (num_p, num_d) == (snap.count(Role.PREFILL), snap.count(Role.DECODE)):
            return []
        reason = (f"sla: {p.rate:.2f} req/s x ISL {isl:.0f} / {prefill_tps:.0f} tok/s per P, "
                  f"x OSL {osl:.0f} / {decode_tps:.0f} tok/s per D -> {num_p}P:{num_d}D")
        return plan_moves(snap, num_p, num_d, reason)

    def describe(self) -> dict:
        t = self.target
        return {"name": self.name, "target": None if t is None else {"prefill": t[0], "decode": t[1], "idle": t[2]}}
