"""Greedy parity: our engine produces transformers' tokens, over a batch of different-length prompts."""

from __future__ import annotations

import pytest

from dopd import LLM, SamplingParams
from dopd.testing import make_random_checkpoint, transformers_greedy

NEW_TOKENS = 24


def _ours(model_dir, prompts, **llm_kwargs):
    llm = LLM(model=str(model_dir), device="cpu", **llm_kwargs)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    return llm, llm.generate([{"prompt_token_ids": p} for p in prompts], params)


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(heads=4, kv_heads=2, tie=False)),  # GQA 2:1
    ("llama", dict(heads=8, kv_heads=1, tie=True, hidden=128)),  # MQA, tied embeddings
    ("llama", dict(heads=4, kv_heads=4, tie=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),  # Llama-3 RoPE scaling, no GQA
    ("qwen2", dict(heads=6, kv_heads=2, hidden=96, tie=True)),  # QKV bias, tied, GQA 3:1
    ("qwen2", dict(heads=4, kv_heads=2, tie=False)),
])
def test_greedy_matches_transformers(tmp_path, prompts, arch, kwargs):
    model_dir = make_random_checkpoint(tmp_path, arch, **kwargs)
    expected, expected_lp = transformers_greedy(model_dir, prompts, NEW_TOKENS)
    _, outputs = _ours(model_dir, prompts)
    for out, want, want_lp in zip(outputs, expected, expected_lp):
        got = out.outputs[0]
        assert got.token_ids == want
        got_lp = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)
        assert got.finish_reason == "length"


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_block_sizes_give_the_same_tokens(llama_dir, prompts, block_size):
    expected, _ = transformers_greedy(llama_dir, prompts, NEW_TOKENS)
    _, outputs = _ours(llama_dir, prompts, block_size=block_size)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_preemption_by_recompute_keeps_tokens(llama_dir, prompts):
    expected, _ = transformers_greedy(llama_dir, prompts, NEW_TOKENS)
    # 60 blocks of 8 tokens hold ~480 tokens: far less than the batch needs at once (~1,200).
    llm, outputs = _ours(llama_dir, prompts, block_size=8, num_kv_blocks=60)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total


def test_chunked_prefill_keeps_tokens(llama_dir, prompts):
    expected, _ = transformers_greedy(llama_dir, prompts, NEW_TOKENS)
    # A 32-token budget splits every long prompt into chunks, and mixes chunks with decodes.
    _, outputs = _ours(llama_dir, prompts, max_num_batched_tokens=32)
    assert [o.outputs[0].token_ids for o in outputs] == expected
