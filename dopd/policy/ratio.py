"""The optimal P/D split, computed analytically (DOPD §3; dopd-paper.md §3 and §9.5).

Pure functions of numbers and a cost model; no state, no I/O.

Derivation
----------
A request costs a prefill worker E[C] seconds, and then holds a decode slot for OSL steps of TPOT
seconds each. Write ISL, OSL for the forecast mean input and output lengths.

1. **Decode concurrency per D worker** (ccd). A decode worker may hold at most
   - what its KV pool fits: ``ccd_mem = kv_capacity_tokens / L̄`` with the average live context
     ``L̄ = ISL + OSL / 2`` (a request's context grows from ISL to ISL + OSL while it decodes), and
   - what keeps a decode step within the TPOT SLO. A step streams the weights and every live KV
     byte, ``t(B) = a_d + b_d·B·L̄ + c_d·B`` in the cost model (``(M_model + B·L̄·M_token) / (α·BW)``
     in the paper's symbols), so ``t(B) ≤ SLO_tpot`` gives ``ccd_bw = (SLO_tpot − a_d) / (b_d·L̄ + c_d)``.
   ``ccd = min(ccd_mem, ccd_bw)``; the TPOT a full decode worker delivers is ``TPOT = t(ccd)``.

2. **Decode workers from the load.** By Little's law, a request rate λ keeps ``λ·OSL·TPOT``
   requests decoding at once, so ``N_D = ⌈λ·OSL·TPOT / ccd⌉``. (The paper writes ``⌈N̂/ccd⌉`` with N̂
   the forecast concurrency; `decode_workers` takes either.)

3. **Prefill workers from balance.** One P worker produces ``1 / E[C]`` prefilled requests a second;
   one D worker consumes ``ccd / (OSL·TPOT)``. Production equals consumption when
   ``N_P / N_D = ccd·E[C] / (OSL·TPOT)``, so ``N_P = ⌈N_D·ccd·E[C] / (OSL·TPOT)⌉``. The released code
   computes the ratio but forgets the ``N_D`` factor (it is only right for N_D = 1); we keep it.

4. **Variance-aware prefill cost.** Prefill cost is convex in the prompt length: ``C(l) = a + b·l +
   c·l²`` (attention is quadratic). Over the length distribution,
   ``E[C] = a + b·E[l] + c·E[l²]`` with ``E[l²] = Var(l) + E[l]²``: at the same mean, more variance
   costs more prefill. Sizing from the mean alone (``C(E[l])``) under-provisions prefill for mixed
   lengths — Jensen's inequality, DOPD's §3.1 argument.

5. **Clamp** to the workers there are, at least one of each role (in disaggregated modes). When
   the demand exceeds the pool, the split keeps the ratio (``N_P ≈ W·r / (1 + r)``); when it is
   below, the rest can be parked (role ``idle``) instead of over-provisioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dopd.sim.costmodel import CostModel


@dataclass(frozen=True, slots=True)
class Split:
    num_prefill: int
    num_decode: int
    num_idle: int
    ccd: int  # decode concurrency per D worker
    tpot: float  # decode step time at ccd
    prefill_cost: float  # E[C], seconds of prefill per request
    ratio: float  # N_P / N_D before rounding and clamping
    demand_prefill: float  # unrounded workers the load needs
    demand_decode: float

    def describe(self) -> str:
        return (f"{self.num_prefill}P:{self.num_decode}D" + (f"+{self.num_idle} idle" if self.num_idle else "")
                + f" (ccd {self.ccd}, ratio {self.ratio:.2f}, need {self.demand_prefill:.1f}P/{self.demand_decode:.1f}D)")


def mean_context(mean_input_len: float, mean_output_len: float) -> float:
    return mean_input_len + mean_output_len / 2


def decode_concurrency(cost: CostModel, mean_input_len: float, mean_output_len: float, tpot_slo: float) -> int:
    """ccd = min(memory bound, bandwidth-at-TPOT-SLO bound), at least 1."""
    ctx = max(1.0, mean_context(mean_input_len, mean_output_len))
    by_memory = cost.kv_capacity_tokens / ctx if cost.kv_capacity_tokens else math.inf
    per_seq = cost.decode_b * ctx + cost.decode_c
    by_bandwidth = (tpot_slo - cost.decode_a) / per_seq if per_seq > 0 else math.inf
    return max(1, int(min(by_memory, by_bandwidth) + 1e-9))  # the epsilon: (0.03 - 0.02) / 1e-4 is 99.999...


def expected_prefill_cost(cost: CostModel, mean_input_len: float, var_input_len: float) -> float:
    """E[C] over the prompt-length distribution: a + b·E[l] + c·(Var + E[l]²)."""
    second_moment = var_input_len + mean_input_len**2
    return cost.prefill_a + cost.prefill_b * mean_input_len + cost.prefill_c * second_moment


def decode_workers(concurrency: float, ccd: int) -> float:
    """Unrounded decode workers for `concurrency` requests decoding at once."""
    return concurrency / ccd


def prefill_workers(num_decode: float, ccd: int, prefill_cost: float, mean_output_len: float, tpot: float) -> float:
    """Unrounded prefill workers that keep up with `num_decode` full decode workers."""
    return num_decode * ccd * prefill_cost / (max(1.0, mean_output_len) * tpot)


def clamp(demand_prefill: float, demand_decode: float, num_workers: int, park: bool,
          min_each: int = 1) -> tuple[int, int, int]:
    """Round a demand to whole workers within the pool: (prefill, decode, idle)."""
    if num_workers < 2 * min_each:
        raise ValueError(f"{num_workers} workers cannot hold {min_each} prefill and {min_each} decode")
    p = max(min_each, math.ceil(demand_prefill - 1e-9))
    d = max(min_each, math.ceil(demand_decode - 1e-9))
    if p + d > num_workers:  # not enough workers: keep the ratio
        share = demand_prefill / (demand_prefill + demand_decode) if demand_prefill + demand_decode else 0.5
        p = min(num_workers - min_each, max(min_each, round(num_workers * share)))
        d = num_workers - p
    idle = num_workers - p - d
    if idle and not park:  # spread the spare workers in proportion to the demand
        share = demand_prefill / (demand_prefill + demand_decode) if demand_prefill + demand_decode else 0.5
        extra_p = round(idle * share)
        p, d, idle = p + extra_p, d + idle - extra_p, 0
    return p, d, idle


def optimal_split(cost: CostModel, rate: float, mean_input_len: float, var_input_len: float,
                  mean_output_len: float, tpot_slo: float, num_workers: int, park: bool = False,
                  headroom: float = 1.0, prefill_correction: float = 1.0, decode_correction: float = 1.0) -> Split:
    """The split for a forecast load (λ req/s, ISL mean/variance, OSL mean) on `num_workers` workers.

    `headroom` sizes for that multiple of the forecast rate; the corrections scale the cost model's
    prefill and decode times by measured/predicted factors.
    """
    ccd = decode_concurrency(cost.scaled(decode=decode_correction), mean_input_len, mean_output_len, tpot_slo)
    decode_cost = cost.scaled(decode=decode_correction)
    tpot = decode_cost.decode_time(ccd, int(ccd * mean_context(mean_input_len, mean_output_len)))
    prefill_cost = expected_prefill_cost(cost, mean_input_len, var_input_len) * prefill_correction
    concurrency = headroom * rate * mean_output_len * tpot
    demand_decode = decode_workers(concurrency, ccd)
    # P is balanced against what the (whole) decode workers consume, as in §3.3: N_P = ⌈N_D⌉·ratio.
    ratio = prefill_workers(1.0, ccd, prefill_cost, mean_output_len, tpot)
    demand_prefill = math.ceil(demand_decode - 1e-9) * ratio
    p, d, idle = clamp(demand_prefill, demand_decode, num_workers, park)
    return Split(p, d, idle, ccd, tpot, prefill_cost, ratio, demand_prefill, demand_decode)
