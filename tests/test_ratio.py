"""The optimal P/D split on hand-computed cases (dopd-paper.md §3)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dopd.policy.ratio import (
    clamp, decode_concurrency, decode_workers, expected_prefill_cost, optimal_split, prefill_workers,
)
from dopd.sim.costmodel import CostModel, get_profile

# A Llama-70B-FP8 decode worker on 2 H100s (§3.4): 2040 blocks of 128 tokens, 0.3125 MiB of KV per token.
PAPER = CostModel("paper", prefill_a=0.0, prefill_b=1e-4, prefill_c=0.0, decode_a=0.02, decode_b=0.0, decode_c=0.0,
                  kv_bytes_per_token=327_680, kv_capacity_tokens=2040 * 128)


def test_worked_example_of_the_paper():
    # ISL 1000, OSL 200: mean live context 1100 tokens -> 9 blocks of 128 -> 2040 // 9 = 226 per D.
    ccd = 2040 // math.ceil((1000 + 200 / 2) / 128)
    assert ccd == 226
    # TTFT(1000) = 0.10 s, TPOT(226, 1100) = 0.05 s: N_P / N_D = 226 * 0.10 / (200 * 0.05) = 2.26
    assert prefill_workers(1, ccd, 0.10, 200, 0.05) == pytest.approx(2.26)
    assert math.ceil(prefill_workers(1, ccd, 0.10, 200, 0.05)) == 3  # 3 P (TP1) per D (TP2): 5 GPUs
    # 500 concurrent requests: N_D = ceil(500 / 226) = 3, N_P = ceil(3 * 2.26) = 7 (the N_D factor
    # the released code forgets)
    num_decode = math.ceil(decode_workers(500, ccd))
    assert num_decode == 3
    assert math.ceil(prefill_workers(num_decode, ccd, 0.10, 200, 0.05)) == 7


def test_memory_and_bandwidth_bounds():
    # Memory-bound: no per-sequence step cost, so only the KV pool limits: 261,120 / 1,100 = 237.
    assert decode_concurrency(PAPER, 1000, 200, tpot_slo=0.05) == 237
    # Bandwidth-bound: each sequence adds 0.1 ms to a 20 ms step; a 50 ms SLO allows 300.
    slow = dataclasses.replace(PAPER, decode_c=1e-4, kv_capacity_tokens=10**9)
    assert decode_concurrency(slow, 1000, 200, tpot_slo=0.05) == 300
    # A tighter SLO binds harder.
    assert decode_concurrency(slow, 1000, 200, tpot_slo=0.03) == 100


def test_variance_raises_the_prefill_cost_and_the_prefill_share():
    cost = get_profile("llama3-70b-fp8", "h100")
    assert expected_prefill_cost(cost, 1000, 0) < expected_prefill_cost(cost, 1000, 800**2)
    steady = optimal_split(cost, rate=40, mean_input_len=1000, var_input_len=0, mean_output_len=200, tpot_slo=0.05,
                           num_workers=64, park=True)
    mixed = optimal_split(cost, rate=40, mean_input_len=1000, var_input_len=2000**2, mean_output_len=200,
                          tpot_slo=0.05, num_workers=64, park=True)
    assert mixed.ratio > steady.ratio
    assert mixed.num_prefill > steady.num_prefill
    assert mixed.num_decode == steady.num_decode  # the decode side does not care about prompt variance


def test_longer_outputs_need_more_decode():
    cost = get_profile("llama3-70b-fp8", "h100")
    short = optimal_split(cost, rate=40, mean_input_len=1000, var_input_len=0, mean_output_len=100, tpot_slo=0.05,
                          num_workers=64, park=True)
    long = optimal_split(cost, rate=40, mean_input_len=1000, var_input_len=0, mean_output_len=800, tpot_slo=0.05,
                         num_workers=64, park=True)
    assert long.num_decode > short.num_decode
    assert long.num_decode / long.num_prefill > short.num_decode / short.num_prefill


def test_clamp_keeps_the_ratio_and_one_of_each():
    assert clamp(6.0, 2.0, 4, park=False) == (3, 1, 0)  # over the pool: 3:1 as demanded
    assert clamp(0.1, 0.1, 4, park=True) == (1, 1, 2)  # low load: one each, the rest parked
    assert clamp(0.1, 0.1, 4, park=False) == (2, 2, 0)  # ... or spread over both roles
    assert clamp(100.0, 0.5, 4, park=False) == (3, 1, 0)  # never zero of a role
    with pytest.raises(ValueError):
        clamp(1, 1, 1, park=False)


def test_split_is_within_the_pool_and_zero_load_parks():
    cost = get_profile("llama3-70b-fp8", "h100")
    for rate in (0, 0.5, 5, 50, 500):
        s = optimal_split(cost, rate=rate, mean_input_len=1500, var_input_len=1e5, mean_output_len=250,
                          tpot_slo=0.05, num_workers=4, park=True)
        assert s.num_prefill >= 1 and s.num_decode >= 1 and s.num_prefill + s.num_decode + s.num_idle == 4
    idle = optimal_split(cost, rate=0, mean_input_len=1500, var_input_len=0, mean_output_len=250, tpot_slo=0.05,
                         num_workers=4, park=True)
    assert (idle.num_prefill, idle.num_decode, idle.num_idle) == (1, 1, 2)
