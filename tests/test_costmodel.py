"""The analytic cost model: calibration against published numbers, the paper's KV capacity, fitting."""

import random

import pytest

from dopd.sim.costmodel import (
    COEFS,
    HARDWARE,
    HARDWARE_NAMES,
    MODELS,
    PROFILE_NAMES,
    CostModel,
    Link,
    attn_work,
    default_tp,
    fit,
    get_link,
    get_profile,
    relative_errors,
    roofline,
)


def close(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def test_opt13b_a100_matches_distserve():
    cm = get_profile("opt-13b", "a100")
    assert cm.num_gpus == 1
    # The reference figures for DistServe's OPT-13B / A100 measurements (1k prefill, 32 × 1k decode).
    assert close(cm.prefill_time([1000]), 0.127, 0.15)
    assert close(cm.decode_time(32, 32 * 1000), 0.041, 0.15)
    # DistServe's own fitted profile (simdistserve profiler-a100-80g.distserve.json, OPT-13B, TP1), in ms.
    a, b, c = 16.456860431694288, 0.09264750660897617, 6.474785740229194e-06
    assert close(cm.prefill_time([1000]), (a + b * 1000 + c * 1000**2) / 1e3, 0.15)
    a, b, c = 19.934702624895458, 0.0006269356524350583, 0.03850697740828398  # decoding_smallbs
    for bs in (8, 32, 64):
        assert close(cm.decode_time(bs, bs * 1000), (a + b * bs * 1000 + c * bs) / 1e3, 0.15)


def test_llama70b_fp8_h100_tp2_kv_matches_paper():
    cm = get_profile("llama3-70b-fp8", "h100")
    assert cm.num_gpus == 2  # 70 GB of weights on 80 GB cards: tp=2 by default
    assert cm.kv_bytes_per_token == 327_680  # 2 × 80 layers × 8 KV heads × 128 × 2 B
    assert close(cm.kv_capacity_tokens, 2040 * 128, 0.15)  # the planner's hard-coded 2040 blocks of 128
    assert get_profile("llama3-70b-fp8", "h200").num_gpus == 1


def test_shapes_and_presets():
    for name in PROFILE_NAMES:
        for hw in HARDWARE_NAMES:
            cm = get_profile(name, hw)
            assert cm.kv_capacity_tokens > 0 and cm.weight_bytes > 0 and cm.mem_bw > 0
            assert cm.prefill_time([4000]) > cm.prefill_time([1000]) > 0
            assert cm.decode_time(64, 64_000) > cm.decode_time(1, 1000) > 0
    assert get_profile("llama3-8b").weight_bytes == pytest.approx(16.06e9, rel=0.01)
    # More HBM bandwidth: faster decode, same prefill FLOPs.
    h100, h200 = roofline("h100", "llama3-8b"), roofline("h200", "llama3-8b")
    assert h200.decode_time(64, 64_000) < h100.decode_time(64, 64_000)
    assert h200.prefill_time([2000]) == pytest.approx(h100.prefill_time([2000]))
    # fp8 weights halve the streamed bytes and double the matmul rate on H100, not on A100.
    fp8, bf16 = roofline("h100", "llama3-70b-fp8", tp=4), roofline("h100", "llama3-70b", tp=4)
    stream = lambda cm: cm.decode_a - cm.prefill_a  # the decode constant less the fixed overheads
    assert stream(fp8) == pytest.approx(0.5 * stream(bf16), rel=0.02)
    assert fp8.prefill_time([2000]) < 0.6 * bf16.prefill_time([2000])
    a_fp8, a_bf16 = roofline("a100", "llama3-70b-fp8", tp=4), roofline("a100", "llama3-70b", tp=4)
    assert a_fp8.prefill_b == pytest.approx(a_bf16.prefill_b)
    with pytest.raises(ValueError, match="no KV room"):
        roofline("h100", "llama3-70b", tp=1)
    assert default_tp(HARDWARE["h100"], MODELS["llama3-70b"]) == 4


def test_prefill_quadratic_and_chunks():
    cm = get_profile("llama3-8b")
    assert attn_work(100) == 100**2 and attn_work(100, 50) == 100 * 200
    long = cm.prefill_time([8000])
    assert long > 2 * cm.prefill_time([4000])  # the l² term makes prefill convex (paper §3.1)
    assert cm.prefill_time([4000, 4000]) < long
    # Chunking 8k into two 4k pieces does the same attention work in total.
    assert attn_work(4000) + attn_work(4000, 4000) == attn_work(8000)
    assert cm.prefill_time([4000], num_cached=[4000]) > cm.prefill_time([4000])


def test_short_prefills_floored_and_batched():
    cm = get_profile("llama3-70b-fp8", "h100", tp=1)
    # One short prompt still streams all weights: as slow as a decode step, so batching is nearly free.
    assert cm.prefill_time([16]) == pytest.approx(cm.decode_a)
    assert cm.prefill_time([16] * 8) == pytest.approx(cm.decode_a)
    assert cm.prefill_time([]) == 0.0 and cm.decode_time(0, 0) == 0.0


def test_mixed_step_reduces_to_pure_forms():
    cm = get_profile("llama3-8b")
    assert cm.step_time(2000, attn_work(2000)) == pytest.approx(cm.prefill_time([2000]))
    assert cm.step_time(num_decodes=32, sum_decode_context=32_000) == pytest.approx(cm.decode_time(32, 32_000))
    mixed = cm.step_time(512, attn_work(512, 1000), 32, 32_000)
    decode_var = cm.decode_time(32, 32_000) - cm.decode_a
    assert mixed == pytest.approx(cm.prefill_time([512], [1000]) + decode_var)
    assert mixed < cm.prefill_time([512], [1000]) + cm.decode_time(32, 32_000)


def test_kv_transfer_time():
    cm = get_profile("llama3-70b-fp8", "h100")
    assert cm.kv_transfer_time(0) == 0.0
    t1, t2 = cm.kv_transfer_time(1000), cm.kv_transfer_time(2000)
    assert t2 - t1 == pytest.approx(1000 * 327_680 / 450e9)
    assert t1 == pytest.approx(30e-6 + 1000 * 327_680 / 450e9)
    slow = get_link("25")
    assert slow == Link("25GB/s", 25e9)
    assert cm.kv_transfer_time(1000, slow) > cm.kv_transfer_time(1000, get_link("pcie")) > t1
    assert get_link("nvlink", "a100").bandwidth == 300e9
    with pytest.raises(ValueError, match="nvlink"):
        get_link("infiniband")


def synthetic(cm: CostModel, rng: random.Random, n: int, noise: float) -> list:
    samples: list = []
    for _ in range(n):
        lengths = [rng.randint(8, 4096) for _ in range(rng.randint(1, 4))]
        samples.append(("prefill", lengths, cm.prefill_time(lengths) * (1 + rng.gauss(0, noise))))
        batch_size = rng.randint(1, 256)
        sum_context = batch_size * rng.randint(16, 4096)  # a profiling grid: batch size × mean context
        decode_s = cm.decode_time(batch_size, sum_context) * (1 + rng.gauss(0, noise))
        samples.append(("decode", (batch_size, sum_context), decode_s))
    return samples


def test_fit_recovers_coefficients():
    truth = get_profile("llama3-8b")
    rng = random.Random(0)
    fitted = fit(synthetic(truth, rng, 300, 0.01), base=truth)
    assert min(getattr(fitted, key) for key in COEFS) >= 0
    for key in COEFS[1:]:
        assert close(getattr(fitted, key), getattr(truth, key), 0.05), key
    assert abs(fitted.prefill_a - truth.prefill_a) < 1e-3  # small intercept: absolute tolerance
    assert fitted.kv_capacity_tokens == truth.kv_capacity_tokens  # memory facts come from base
    held_out = synthetic(truth, random.Random(1), 50, 0.0)
    held_out.append(("prefill", [8000], truth.prefill_time([8000])))  # longer than any fitted prompt
    held_out.append(("prefill", [(1000, 6000)], truth.prefill_time([1000], [6000])))  # a chunk over a cache
    assert max(abs(e) for e in relative_errors(fitted, held_out)) < 0.05


def test_fit_clamps_negative():
    # Decode time that falls with context would need b < 0: the fit must clamp it to zero.
    shapes = [(bs, ctx) for bs in (1, 8, 32, 64) for ctx in (bs * 10, bs * 1000)]
    samples = [("decode", (bs, ctx), 0.01 + 1e-4 * bs - 1e-9 * ctx) for bs, ctx in shapes]
    fitted = fit(samples)
    assert fitted.decode_b == 0.0 and fitted.decode_a > 0 and fitted.decode_c > 0


def test_save_load_roundtrip(tmp_path):
    cm = get_profile("opt-30b", "a100")
    path = tmp_path / "profile.json"
    cm.save(path)
    assert CostModel.load(path) == cm
    assert get_profile(str(path)) == cm
    with pytest.raises(ValueError, match="tp=2"):
        get_profile(str(path), tp=4)
    (tmp_path / "bad.json").write_text('{"nope": 1}')
    with pytest.raises(ValueError, match="not a cost-model profile"):
        CostModel.load(tmp_path / "bad.json")


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as err:
        get_profile("gpt-5")
    assert all(name in str(err.value) for name in PROFILE_NAMES)
    with pytest.raises(ValueError) as err:
        get_profile("llama3-8b", "tpu")
    assert all(name in str(err.value) for name in HARDWARE_NAMES)


def test_scaled():
    cm = get_profile("llama3-8b")
    slow = cm.scaled(prefill=2.0, decode=1.5)
    assert slow.prefill_time([3000]) == pytest.approx(2 * cm.prefill_time([3000]))
    assert slow.decode_time(16, 16_000) == pytest.approx(1.5 * cm.decode_time(16, 16_000))


def test_small_batch_regime_is_fitted_and_used_only_for_pure_small_decodes(tmp_path):
    # The CPU engine's decode: GEMV below 4 rows (cheap constant, steep per row), packed GEMM from
    # 4 (a jump, then flat): one line through both misses batch 3 by ~20%.
    truth = CostModel("cpu-like", 0.02, 1e-3, 1e-8, 0.075, 2e-6, 1.5e-3, small_batch_rows=4,
                      small_decode_a=0.050, small_decode_c=4e-3)
    grid = [(b, b * c) for b in (1, 2, 3, 4, 8, 16, 32) for c in (16, 256, 1024)]
    samples = [("decode", shape, truth.decode_time(*shape)) for shape in grid]
    samples += [("prefill", [n], truth.prefill_time([n])) for n in (64, 256, 1024, 2048)]
    held_out = [("decode", (3, 900), truth.decode_time(3, 900)), ("decode", (6, 5400), truth.decode_time(6, 5400))]
    one_line = fit(samples)
    assert one_line.small_batch_rows == 0 and max(abs(e) for e in relative_errors(one_line, held_out)) > 0.1
    two = fit(samples, small_batch_rows=4)
    assert max(abs(e) for e in relative_errors(two, held_out)) < 1e-6
    assert (two.small_decode_a, two.small_decode_c) == (pytest.approx(0.050), pytest.approx(4e-3))
    # a mixed step has prefill rows as well: the large regime
    assert two.step_time(16, 256, 2, 2000) == pytest.approx(max(two.prefill_time([16]), two.decode_a) + 2e-6 * 2000 + 1.5e-3 * 2)
    assert two.scaled(decode=2.0).decode_time(2, 100) == pytest.approx(2 * two.decode_time(2, 100))
    two.save(tmp_path / "p.json")
    assert CostModel.load(tmp_path / "p.json") == two
