"""Metrics on hand-made records whose answers are known."""

import numpy as np
import pytest

from dopd.metrics import (
    SLO, RequestRecord, attainment, decode_records, distserve_goodput, encode_records, format_table,
    interpolate_goodput, min_slo_scale, slo_scale_curve, summarize, tpot,
)


def rec(i: int, ttft: float | None, e2el: float | None, output_len: int, *, success: bool = True,
        itl: list[float] | None = None, input_len: int = 100) -> RequestRecord:
    return RequestRecord(request_id=f"r{i}", arrival_time=float(i), input_len=input_len, output_len=output_len,
                         ttft=ttft, itl=itl or [], e2el=e2el, success=success, error="" if success else "boom")


def failed(i: int) -> RequestRecord:
    return rec(i, None, None, 0, success=False)


def test_tpot_excludes_first_token():
    r = rec(0, ttft=0.5, e2el=1.5, output_len=11)
    assert tpot(r) == pytest.approx(0.1)  # (1.5 − 0.5) / (11 − 1), not / 11
    assert r.tpot == pytest.approx(0.1)


def test_one_token_request_has_tpot_zero_and_can_be_good():
    r = rec(0, ttft=0.2, e2el=0.2, output_len=1)
    assert tpot(r) == 0.0
    assert attainment([r], SLO(ttft=0.3, tpot=0.001)) == 1.0
    # but it is left out of the TPOT latency statistics, as vLLM does
    assert summarize([r], 1.0, None)["tpot_mean"] is None


def test_failed_requests_never_good_and_count_in_denominator():
    records = [rec(0, 0.1, 1.0, 10), failed(1), failed(2), rec(3, 0.1, 1.0, 10)]
    assert tpot(records[1]) is None
    slo = SLO(ttft=1.0, tpot=1.0)
    s = summarize(records, duration_s=4.0, slo=slo)
    assert s["num_requests"] == 4 and s["num_completed"] == 2 and s["num_failed"] == 2
    assert s["slo_attainment"] == 0.5
    assert s["num_good"] == 2
    assert s["goodput_rps"] == pytest.approx(0.5)
    assert s["request_throughput_rps"] == pytest.approx(0.5)


def test_joint_and_single_attainment():
    slo = SLO(ttft=0.5, tpot=0.05)
    records = [
        rec(0, 0.2, 0.2 + 9 * 0.01, 10),  # good
        rec(1, 0.9, 0.9 + 9 * 0.01, 10),  # TTFT miss
        rec(2, 0.2, 0.2 + 9 * 0.10, 10),  # TPOT miss
        rec(3, 0.9, 0.9 + 9 * 0.10, 10),  # both miss
    ]
    s = summarize(records, 2.0, slo, num_gpus=2)
    assert s["slo_attainment"] == 0.25
    assert s["ttft_attainment"] == 0.5
    assert s["tpot_attainment"] == 0.5
    assert s["goodput_rps"] == pytest.approx(0.5)
    assert s["goodput_rps_per_gpu"] == pytest.approx(0.25)


def test_itl_is_pooled_across_requests():
    records = [rec(0, 0.1, 0.4, 4, itl=[0.1, 0.1, 0.1]), rec(1, 0.1, 1.1, 2, itl=[1.0])]
    s = summarize(records, 1.0, None)
    assert s["itl_mean"] == pytest.approx(1.3 / 4)  # per gap, not per request (which would be 0.55)
    assert s["itl_median"] == pytest.approx(0.1)
    assert s["tpot_mean"] == pytest.approx((0.1 + 1.0) / 2)  # per request


def test_percentiles_on_known_list():
    records = [rec(i, ttft=float(v), e2el=float(v) + 1, output_len=2) for i, v in enumerate([1, 2, 3, 4, 5])]
    s = summarize(records, 5.0, None)
    assert s["ttft_mean"] == pytest.approx(3.0)
    assert s["ttft_median"] == pytest.approx(3.0)
    assert s["ttft_p90"] == pytest.approx(4.6)
    assert s["ttft_p99"] == pytest.approx(4.96)
    assert s["e2el_p90"] == pytest.approx(5.6)
    assert s["tpot_p90"] == pytest.approx(1.0)


def test_token_throughput():
    records = [rec(0, 0.1, 1.0, 10, input_len=90), rec(1, 0.1, 1.0, 30, input_len=70), failed(2)]
    s = summarize(records, 4.0, None)
    assert s["output_throughput_tps"] == pytest.approx(10.0)
    assert s["total_token_throughput_tps"] == pytest.approx(50.0)


def test_empty_input():
    s = summarize([], 0.0, SLO(1.0, 1.0))
    assert s["num_requests"] == 0 and s["goodput_rps"] == 0.0 and s["slo_attainment"] == 0.0
    assert s["ttft_p90"] is None and s["tpot_p90"] is None
    s = summarize([], 10.0, None)
    assert s["goodput_rps"] is None and s["slo_attainment"] is None
    assert "TTFT" in format_table(s)
    assert slo_scale_curve([], SLO(1, 1)) and min_slo_scale([], SLO(1, 1)) is None


def test_bisection_finds_known_threshold():
    step = lambda rate: 1.0 if rate <= 3.7 else 0.5  # noqa: E731
    assert distserve_goodput(step, 0.1, 10.0, tol=1e-3) == pytest.approx(3.7, abs=1e-3)
    linear = lambda rate: 1.0 - rate / 10.0  # attainment 0.9 exactly at rate 1  # noqa: E731
    assert distserve_goodput(linear, 0.0, 8.0, target=0.9, tol=1e-4) == pytest.approx(1.0, abs=1e-4)
    assert distserve_goodput(lambda r: 1.0, 0.1, 5.0) == 5.0
    assert distserve_goodput(lambda r: 0.0, 0.1, 5.0) == 0.0


def test_interpolation_on_hand_sweep():
    rates = [1.0, 2.0, 3.0, 4.0]
    assert interpolate_goodput(rates, [1.0, 0.95, 0.85, 0.5]) == pytest.approx(2.5)
    assert interpolate_goodput(rates[::-1], [0.5, 0.85, 0.95, 1.0]) == pytest.approx(2.5)  # order free
    assert interpolate_goodput(rates, [1.0, 1.0, 1.0, 0.95]) == 4.0
    assert interpolate_goodput(rates, [0.8, 0.7, 0.6, 0.5]) == 0.0
    # non-monotone: the highest crossing counts
    assert interpolate_goodput(rates, [1.0, 0.8, 1.0, 0.0]) == pytest.approx(3.1)
    assert interpolate_goodput([], []) == 0.0


def test_slo_scale_curve_monotone_and_min_scale():
    slo = SLO(ttft=1.0, tpot=0.1)
    # request i: TTFT ≈ 0.1·(i+1), TPOT ≈ 0.01·(i+1), kept off the scale grid so floats cannot tie
    records = [rec(i, ttft=0.1 * (i + 1) - 0.005, e2el=0.1 * (i + 1) - 0.005 + 9 * (0.01 * (i + 1) - 0.0005),
                   output_len=10) for i in range(10)]
    curve = slo_scale_curve(records, slo)
    scales = [s for s, _ in curve]
    values = [a for _, a in curve]
    assert scales == sorted(scales, reverse=True) and scales[0] == 1.6 and scales[-1] == 0.4
    assert all(a >= b for a, b in zip(values, values[1:]))  # tighter SLO never helps
    # 90 % good needs requests 0..8 to pass: TTFT ≤ ~0.9 → scale 0.9
    assert min_slo_scale(records, slo) == pytest.approx(0.9)
    assert dict(curve)[1.0] == 1.0


def test_records_round_trip_jsonl():
    records = [rec(0, 0.1, 1.0, 3, itl=[0.4, 0.5]), failed(1)]
    data = encode_records(records)
    assert data.count(b"\n") == 2
    assert decode_records(data) == records


def test_format_table_has_main_numbers():
    records = [rec(0, 0.1, 1.0, 10), failed(1)]
    text = format_table(summarize(records, 2.0, SLO(0.5, 0.2), num_gpus=4))
    assert "| goodput (req/s) | 0.500 |" in text
    assert "50.0 %" in text and "TPOT" in text
    assert "nan" not in text.lower()


def test_numpy_percentile_convention():
    # the summary uses numpy's default (linear) percentiles, like vLLM
    values = [0.3, 0.1, 0.2, 0.9]
    records = [rec(i, v, v + 1, 2) for i, v in enumerate(values)]
    assert summarize(records, 1.0, None)["ttft_p99"] == pytest.approx(float(np.percentile(values, 99)))
