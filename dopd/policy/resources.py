"""The resource monitor (DOPD §2): what the last interval looked like, as numbers the policy uses.

Fed by the controller (or the simulator) with arrivals, decode steps and finished requests;
`close(now, ...)` ends the interval and returns its statistics. Pure: the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dopd.metrics import SLO, RequestRecord, meets, tpot
from dopd.sim.costmodel import CostModel

MAX_DECODE_STEPS = 4096  # per interval: plenty for a ratio, bounded memory


@dataclass(frozen=True, slots=True)
class IntervalStats:
    start: float
    end: float
    num_arrivals: int
    arrival_rate: float  # req/s
    mean_input_len: float  # of the arrivals
    var_input_len: float
    mean_output_len: float  # estimated for the arrivals (see `close`)
    num_finished: int
    num_failed: int
    ttft_p50: float | None
    ttft_p90: float | None
    tpot_p50: float | None
    tpot_p90: float | None
    attainment: float | None
    queued_prefill_requests: int
    handoff_queue: int
    kv_usage: dict[int, float] = field(default_factory=dict)  # per worker
    # Pure decode steps of decode workers: (sequences, context tokens, seconds a step, steps)
    decode_steps: tuple[tuple[int, int, float, int], ...] = ()


@dataclass(slots=True)
class ResourceMonitor:
    slo: SLO
    started: float = 0.0
    _input_lens: list[int] = field(default_factory=list)
    _max_tokens: list[int] = field(default_factory=list)
    _finished: list[RequestRecord] = field(default_factory=list)
    _finished_max_tokens: list[int] = field(default_factory=list)
    _decode_steps: list[tuple[int, int, float, int]] = field(default_factory=list)
    _output_share: float = 1.0  # output length / max_tokens of finished requests (EWMA)
    _last_output_len: float = 0.0

    def on_arrival(self, input_len: int, max_tokens: int) -> None:
        self._input_lens.append(input_len)
        self._max_tokens.append(max_tokens)

    def on_decode_step(self, num_seqs: int, context_tokens: int, seconds: float, num_steps: int = 1) -> None:
        """A decode worker ran `num_steps` steps of decodes only, `seconds` each."""
        if len(self._decode_steps) < MAX_DECODE_STEPS:
            self._decode_steps.append((num_seqs, context_tokens, seconds, num_steps))

    def on_finish(self, record: RequestRecord, max_tokens: int = 0) -> None:
        self._finished.append(record)
        if record.success and max_tokens > 0:
            self._finished_max_tokens.append(max_tokens)
            self._output_share += 0.05 * (min(1.0, record.output_len / max_tokens) - self._output_share)

    def close(self, now: float, kv_usage: dict[int, float],
              queued_prefill_requests: int, handoff_queue: int) -> IntervalStats:
        span = max(1e-9, now - self.started)
        lens = np.asarray(self._input_lens, dtype=float)
        done = self._finished
        ok = [r for r in done if r.success]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        tpots = [tpot(r) for r in ok if r.output_len > 1]

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        # A request's output length is known when it finishes, a request lifetime after it arrived:
        # a forecast from finished requests lags a shift by that long. So the arrivals' max_tokens,
        # scaled by how much of max_tokens finished requests used, stand for the interval's output.
        if self._max_tokens:
            self._last_output_len = float(np.mean(self._max_tokens)) * self._output_share
        elif ok:
            self._last_output_len = float(np.mean([r.output_len for r in ok]))
        stats = IntervalStats(
            start=self.started, end=now, num_arrivals=len(lens), arrival_rate=len(lens) / span,
            mean_input_len=float(lens.mean()) if len(lens) else 0.0,
            var_input_len=float(lens.var()) if len(lens) else 0.0,
            mean_output_len=self._last_output_len,
            num_finished=len(done), num_failed=len(done) - len(ok),
            ttft_p50=pct(ttfts, 50), ttft_p90=pct(ttfts, 90), tpot_p50=pct(tpots, 50), tpot_p90=pct(tpots, 90),
            attainment=sum(meets(r, self.slo) for r in done) / len(done) if done else None,
            queued_prefill_requests=queued_prefill_requests, handoff_queue=handoff_queue, kv_usage=dict(kv_usage),
            decode_steps=tuple(self._decode_steps),
        )
        self.started = now
        self._input_lens, self._max_tokens, self._finished, self._finished_max_tokens = [], [], [], []
        self._decode_steps = []
        return stats


def decode_step_seconds(stats: IntervalStats, cost: CostModel) -> tuple[float, float] | None:
    """(measured, modelled) seconds of the interval's pure decode steps, for the decode correction.

    From the workers' own step times, not from requests' TPOT: a TPOT also holds the wait of a
    prefilled request for decode room, and a correction inflated by that wait makes admission hold
    more requests back, which inflates the next TPOT — a loop that only the correction's clamp ends.
    """
    if not stats.decode_steps:
        return None
    measured = sum(seconds * n for _, _, seconds, n in stats.decode_steps)
    modelled = sum(cost.decode_time(seqs, ctx) * n for seqs, ctx, _, n in stats.decode_steps)
    return measured, modelled
