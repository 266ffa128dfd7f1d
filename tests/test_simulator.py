"""The virtual-clock simulator: its CLI's output, nothing lost, determinism, and the policy at work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dopd.messages import Role
from dopd.metrics import SLO, RequestRecord
from dopd.sim.costmodel import get_profile
from dopd.sim.simulator import SimConfig, Simulator
from dopd.workload import synthetic

ROOT = Path(__file__).resolve().parents[1]
COST = get_profile("llama3-70b-fp8", "h200")
SLO_ = SLO(1.5, 0.05)
# decode-heavy (short prompts, long outputs), then prefill-heavy (long prompts, a few tokens)
PREFILL_HEAVY = "constant:rate=6,duration=60,in=6000,out=4"  # 6000-token prompts: ~0.74 s of prefill each
SHIFT = "constant:rate=8,duration=60,in=128,out=600;" + PREFILL_HEAVY


def simulate(policy: str, split, spec: str, seed: int = 0):
    cfg = SimConfig(cost=COST, num_workers=8, policy=policy, pd_ratio=split, slo=SLO_)
    return Simulator(cfg, synthetic(spec, seed=seed)).run()


def test_the_cli_writes_the_summary_and_records_in_the_benchmarks_schema(tmp_path):
    out = tmp_path / "sim.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), "--synthetic",
                    "poisson:rate=6,n=300,in=azure-conv,out=azure-conv", "--gpus", "8", "--hardware", "h200",
                    "--model-profile", "llama3-70b-fp8", "--policy", "static", "--pd-ratio", "5:3",
                    "--slo-ttft", "1.5", "--slo-tpot", "0.05", "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    for key in ("goodput_rps", "slo_attainment", "ttft_p90", "tpot_p90", "num_requests"):
        assert isinstance(result[key], (int, float)), key
    assert result["num_requests"] == len(result["records"]) == 300
    fields = set(RequestRecord.__struct_fields__)
    assert all(set(r) == fields for r in result["records"])
    assert 0 < result["goodput_rps"] and 0.9 <= result["slo_attainment"] <= 1.0  # 6 req/s is light for 8 GPUs


@pytest.mark.parametrize("policy,split", [("colocated", None), ("static", (4, 4)), ("dopd", (1, 1)),
                                          ("sla", (1, 1)), ("load_threshold", (1, 1))])
def test_every_request_ends_with_all_its_tokens(policy, split):
    result = simulate(policy, split, SHIFT)
    reqs = synthetic(SHIFT)
    assert len(result.records) == len(reqs)
    assert all(r.success and r.ttft is not None for r in result.records)
    assert [r.output_len for r in result.records] == [r.output_len for r in reqs]  # records keep no ITLs


def test_the_same_inputs_give_the_same_result():
    a, b = simulate("dopd", (1, 1), SHIFT), simulate("dopd", (1, 1), SHIFT)
    assert a.summary == b.summary and a.role_changes == b.role_changes


def test_dopd_follows_a_shift_from_decode_heavy_to_prefill_heavy():
    result = simulate("dopd", (1, 1), SHIFT)
    def split_at(t):
        point = max((p for p in result.timeline if p["time"] <= t), key=lambda p: p["time"])
        return point[Role.PREFILL.name.lower()], point[Role.DECODE.name.lower()]
    decode_phase, prefill_phase = split_at(55), split_at(115)
    assert decode_phase[1] >= decode_phase[0]  # decode-heavy: at least as many D as P
    assert prefill_phase[0] > prefill_phase[1]  # 6000-token prompts at 6/s: mostly P
    assert result.summary["slo_attainment"] >= 0.9


def test_a_split_that_starves_prefill_misses_the_ttft_slo():
    starved, balanced = simulate("static", (1, 7), PREFILL_HEAVY), simulate("static", (7, 1), PREFILL_HEAVY)
    assert starved.summary["ttft_p90"] > SLO_.ttft > balanced.summary["ttft_p90"]


def test_a_shared_prefix_is_prefilled_once_per_worker_in_the_simulation(tmp_path):
    """Mooncake-style requests sharing their first 512-token block: with prefix caching the
    simulated prefill workers compute it once each, so TTFT falls; pools end whole either way."""
    from dopd.workload import load_mooncake, prefix_block_keys

    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 300 * i, "input_length": 6000, "output_length": 8,
             "hash_ids": [7] + [1000 + 12 * i + j for j in range(11)]} for i in range(200)]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    reqs = load_mooncake(trace)
    # Keys: the shared block agrees across requests, the rest does not, and a block is 512/16 keys.
    a, b = prefix_block_keys(reqs[0].hash_ids, 6000, 0, 16), prefix_block_keys(reqs[1].hash_ids, 6000, 1, 16)
    assert a[:32] == b[:32] and a[32] != b[32] and len(a) == 6000 // 16
    assert prefix_block_keys(None, 600, 0, 16)[0] != prefix_block_keys(None, 600, 1, 16)[0]
    assert prefix_block_keys([5], 600, 0, 16)[31] == prefix_block_keys([5], 900, 1, 16)[31]
    assert prefix_block_keys([5], 600, 0, 16)[32] != prefix_block_keys([5], 600, 1, 16)[32]  # past the ids

    def run(caching: bool):
        cfg = SimConfig(cost=COST, num_workers=8, policy="static", pd_ratio=(4, 4), slo=SLO_, prefix_caching=caching)
        sim = Simulator(cfg, reqs)
        result = sim.run()
        assert len(result.records) == 200 and all(r.success for r in result.records)
        assert all(w.scheduler.allocator.num_free == w.scheduler.allocator.num_total for w in sim.workers)
        return result, sim

    (cached, sim), (plain, _) = run(True), run(False)
    assert sum(w.scheduler.allocator.num_cached for w in sim.workers) > 0
    mean_ttft = lambda result: sum(r.ttft for r in result.records) / len(result.records)  # noqa: E731
    assert mean_ttft(cached) < 0.97 * mean_ttft(plain)  # 512 of 6,000 tokens not computed again
