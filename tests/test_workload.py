"""Workload loaders (on fixtures and, when present, the real traces), transforms and generators."""

import math
from pathlib import Path

import numpy as np
import pytest

from dopd.workload import (
    LENGTH_DISTS, WorkloadRequest, arrivals, clip, describe, load_azure, load_burstgpt, load_mooncake,
    load_sharegpt, load_trace, parse_spec, sample_lengths, scale_rate, splice, synthetic, take,
)

DATA = Path(__file__).parent / "data"
SHARED = Path("/work/shared/data")


def is_relative_and_sorted(reqs: list[WorkloadRequest]) -> bool:
    times = [r.arrival_time for r in reqs]
    return times[0] == 0.0 and times == sorted(times)


# ---------------------------------------------------------------- loaders on fixtures


def test_azure_fixture():
    reqs = load_azure(DATA / "azure_code_200.csv")
    assert len(reqs) == 200 and is_relative_and_sorted(reqs)
    assert (reqs[0].input_len, reqs[0].output_len) == (4808, 10)
    assert reqs[1].arrival_time == pytest.approx(0.052, abs=1e-6)  # 04.0319600 − 03.9799600
    assert reqs[0].prompt is None and reqs[0].hash_ids is None
    conv = load_trace(DATA / "azure_conv_200.csv")
    assert len(conv) == 200 and (conv[0].input_len, conv[0].output_len) == (374, 44)
    assert conv[1].arrival_time == pytest.approx(4.3145789, abs=1e-6)


def test_mooncake_fixture():
    reqs = load_mooncake(DATA / "mooncake_conv_200.jsonl")
    assert len(reqs) == 200 and is_relative_and_sorted(reqs)
    assert (reqs[0].input_len, reqs[0].output_len) == (6758, 500)
    assert reqs[0].hash_ids == list(range(14))
    assert all(len(r.hash_ids) == math.ceil(r.input_len / 512) for r in reqs)
    assert reqs[-1].arrival_time < 100  # ms were turned into seconds
    assert load_trace(DATA / "mooncake_conv_200.jsonl") == reqs


def test_burstgpt_fixture():
    reqs = load_burstgpt(DATA / "burstgpt_sample.csv")
    assert [r.arrival_time for r in reqs] == [0.0, 40.0, 127.0, 135.0, 152.0, 169.0]  # failures dropped
    assert (reqs[0].input_len, reqs[0].output_len) == (472, 18)
    gpt4 = load_trace(DATA / "burstgpt_sample.csv", model="GPT-4")
    assert [(r.arrival_time, r.input_len, r.output_len) for r in gpt4] == [(0.0, 1012, 355), (17.0, 298, 96)]


def test_sharegpt_fixture():
    reqs = load_sharegpt(DATA / "sharegpt_sample.json")
    assert len(reqs) == 4  # unanswered and empty conversations skipped
    assert reqs[0].prompt == "What is the capital of France?"
    assert reqs[1].prompt == "Write a haiku about the sea."  # system turn skipped
    assert reqs[2].prompt.startswith("Explain the difference")  # a leading gpt greeting skipped
    assert all(r.arrival_time == 0.0 for r in reqs)  # default rate = inf, as vLLM
    words = load_sharegpt(DATA / "sharegpt_sample.json", count_tokens=lambda s: len(s.split()))
    assert (words[0].input_len, words[0].output_len) == (6, 12)
    assert [r.output_len for r in words][-1] == 1
    pruned = load_sharegpt(DATA / "sharegpt_sample.json", prune=True)
    assert len(pruned) == 3  # "Hi" / "Hi!" is shorter than 4 tokens
    timed = load_trace(DATA / "sharegpt_sample.json", rate=2.0, seed=1)
    assert is_relative_and_sorted(timed) and timed[-1].arrival_time > 0
    assert load_sharegpt(DATA / "sharegpt_sample.json", rate=2.0, seed=1) == timed
    assert len(load_sharegpt(DATA / "sharegpt_sample.json", num_requests=2)) == 2


def test_load_trace_rejects_unknown(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError):
        load_trace(path)


# ---------------------------------------------------------------- real traces (workloads.md §6)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared traces not present")
@pytest.mark.parametrize(("name", "num", "mean_in", "mean_out", "rate"), [
    ("azure_llm_2023_conv.csv", 19366, 1155, 211, 5.53),
    ("azure_llm_2023_code.csv", 8819, 2048, 28, 2.57),
    ("mooncake_conversation.jsonl", 12031, 12035, 343, 3.40),
])
def test_real_traces_match_workloads_md(name, num, mean_in, mean_out, rate):
    d = describe(load_trace(SHARED / name))
    assert d["num_requests"] == num
    assert d["input_mean"] == pytest.approx(mean_in, rel=0.02)
    assert d["output_mean"] == pytest.approx(mean_out, rel=0.02)
    assert d["rate_rps"] == pytest.approx(rate, rel=0.02)


# ---------------------------------------------------------------- transforms


def wl(*times: float) -> list[WorkloadRequest]:
    return [WorkloadRequest(t, 1000, 100, hash_ids=[1, 2]) for t in times]


def test_scale_rate_take_clip():
    reqs = wl(0.0, 1.0, 2.0, 3.0)
    assert [r.arrival_time for r in scale_rate(reqs, 2.0)] == [0.0, 0.5, 1.0, 1.5]
    assert len(take(reqs, n=2)) == 2 and len(take(reqs, duration=2.0)) == 2
    clipped = clip(reqs, max_input_len=300, max_output_len=50)
    assert (clipped[0].input_len, clipped[0].output_len, clipped[0].hash_ids) == (300, 50, [1])
    assert clip([WorkloadRequest(0.0, 0, 0)])[0].input_len == 1  # min_len
    assert reqs[0].input_len == 1000  # inputs are not mutated
    with pytest.raises(ValueError):
        scale_rate(reqs, 0.0)


def test_splice_shifts_phases():
    out = splice([wl(0.0, 1.0, 2.0), wl(0.0, 0.5)])
    assert [r.arrival_time for r in out] == [0.0, 1.0, 2.0, 3.0, 3.5]  # default span: last + mean gap
    out = splice([wl(0.0, 1.0), wl(0.0)], spans=[10.0, None])
    assert [r.arrival_time for r in out] == [0.0, 1.0, 10.0]


def test_describe_small():
    d = describe([WorkloadRequest(0.0, 10, 1), WorkloadRequest(2.0, 30, 3)])
    assert d["num_requests"] == 2 and d["duration_s"] == 2.0 and d["rate_rps"] == 1.0
    assert d["input_mean"] == 20.0 and d["output_median"] == 2.0 and d["in_out_ratio"] == 10.0
    assert describe([])["num_requests"] == 0


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("burstiness", [1.0, 0.25])
def test_gamma_arrivals_rate_and_cv(burstiness):
    times = arrivals(10.0, duration=3000.0, burstiness=burstiness, rng=np.random.default_rng(7))
    gaps = np.diff(times)
    assert len(times) / 3000.0 == pytest.approx(10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)
    assert times[0] == 0.0 and times.max() < 3000.0


def test_arrivals_by_count_and_constant():
    times = arrivals(4.0, n=1000, burstiness=0.5, rng=np.random.default_rng(0))
    assert len(times) == 1000 and times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert times[-1] < 1000 / 4.0  # the n gaps sum to exactly n/rate; the last one lies beyond
    assert np.allclose(np.diff(arrivals(2.0, n=5, burstiness=math.inf)), 0.5)
    assert np.all(arrivals(math.inf, n=3) == 0.0)
    with pytest.raises(ValueError):
        arrivals(1.0)


# workloads.md §6: (input mean, median), (output mean, median)
TARGETS = {
    "azure-code": ((2048, 1469), (28, 13)),
    "azure-conv": ((1155, 1020), (211, 129)),
    "mooncake": ((12035, 6909), (343, 350)),
    "sharegpt": ((219, 105), (201, 134)),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_named_distributions_match_workloads_md(name):
    assert set(TARGETS) == set(LENGTH_DISTS)
    rng = np.random.default_rng(3)
    for output, (mean, median) in enumerate(TARGETS[name]):
        x = sample_lengths(name, 50_000, rng, output=bool(output))
        assert x.min() >= 1 and x.max() <= LENGTH_DISTS[name][output].max_len
        assert x.mean() == pytest.approx(mean, rel=0.1)
        assert np.median(x) == pytest.approx(median, rel=0.1)


def test_spec_with_phases():
    spec = ("poisson:rate=2,duration=120,in=azure-conv,out=azure-conv;"
            "gamma:rate=4,burstiness=0.25,duration=60,in=1000,out=200;"
            "constant:rate=1,n=5,in=7,out=3")
    assert [kind for kind, _ in parse_spec(spec)] == ["poisson", "gamma", "constant"]
    reqs = synthetic(spec, seed=1)
    first = [r for r in reqs if r.arrival_time < 120]
    second = [r for r in reqs if 120 <= r.arrival_time < 180]
    third = [r for r in reqs if r.arrival_time >= 180]
    assert len(first) == pytest.approx(240, rel=0.25) and len(second) == pytest.approx(240, rel=0.5)
    assert all((r.input_len, r.output_len) == (1000, 200) for r in second)
    assert [r.arrival_time for r in third] == [180.0, 181.0, 182.0, 183.0, 184.0]
    assert [(r.input_len, r.output_len) for r in third] == [(7, 3)] * 5


def test_spec_n_cv_clip_and_trace():
    reqs = synthetic("gamma:rate=4,cv=2,n=1000,in=mooncake,out=mooncake,max_in=8192,max_out=256")
    assert len(reqs) == 1000 and max(r.input_len for r in reqs) == 8192 and max(r.output_len for r in reqs) <= 256
    trace = synthetic(f"trace:path={DATA / 'azure_conv_200.csv'},scale=2,duration=10;"
                      f"poisson:rate=1,n=3,in=5,out=5")
    original = take(load_azure(DATA / "azure_conv_200.csv"), duration=20)  # 20 trace-s = 10 s at 2×
    assert 0 < len(original) < 200
    assert len(trace) == len(original) + 3 and trace[-3].arrival_time == 10.0
    assert trace[len(original) - 1].arrival_time == pytest.approx(original[-1].arrival_time / 2)
    shifted = synthetic(f"trace:path={DATA / 'azure_conv_200.csv'},start=30,n=2")
    assert len(shifted) == 2 and shifted[0].arrival_time >= 0.0
    assert len(synthetic(f"trace:path={DATA / 'sharegpt_sample.json'},rate=1")) == 4


def test_spec_errors():
    with pytest.raises(ValueError):
        parse_spec("poisson:rate=2,n=10,in=1,out=1,bogus=3")
    with pytest.raises(ValueError):
        synthetic("zipf:rate=2,n=10,in=1,out=1")
    with pytest.raises(ValueError):
        synthetic("poisson:rate=2,n=10,in=nonesuch,out=1")
    with pytest.raises(ValueError):
        parse_spec(" ; ")


def test_determinism_by_seed():
    spec = "gamma:rate=3,burstiness=0.5,n=200,in=sharegpt,out=sharegpt;poisson:rate=1,duration=30,in=mooncake,out=10"
    assert synthetic(spec, seed=5) == synthetic(spec, seed=5)
    assert synthetic(spec, seed=5) != synthetic(spec, seed=6)
    # phases draw from their own streams: changing phase 2 leaves phase 1 as it was
    other = spec.replace("out=10", "out=20")
    assert synthetic(spec, seed=5)[:200] == synthetic(other, seed=5)[:200]
