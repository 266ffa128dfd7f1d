"""The offline API: vLLM's shapes, every sampling option, dtypes, errors, and the real SmolLM2."""

from __future__ import annotations

import json

import pytest

from dopd import LLM, SamplingParams
from dopd.embedded import resolve_model
from dopd.testing import make_random_checkpoint, transformers_greedy
from dopd.workers.cpu_kernels import library
from dopd.workers.model import Linear


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), device="cpu")


def test_request_output_has_vllms_shape(llm, prompts):
    out = llm.generate({"prompt_token_ids": prompts[3]}, SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert out.prompt_token_ids == prompts[3]
    c = out.outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length" and isinstance(c.text, str)
    assert len(c.logprobs) == 5
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy: the chosen token is the top one
        assert len(entry) == 3  # the chosen token is among the top 3
        values = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [v.logprob for v in values] == sorted([v.logprob for v in values], reverse=True)
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_text_prompts_and_order(llm):
    outs = llm.generate(["def f(x):", "import os", "class A:"], SamplingParams(max_tokens=4, temperature=0))
    assert [o.prompt for o in outs] == ["def f(x):", "import os", "class A:"]
    single = llm.generate("import os", SamplingParams(max_tokens=4, temperature=0))[0]
    assert single.outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm, prompts):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    alone = llm.generate({"prompt_token_ids": prompts[2]}, params)[0].outputs[0].token_ids
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts[:6]], params)
    assert batch[2].outputs[0].token_ids == alone
    other = llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(max_tokens=12, temperature=1.0, seed=99))
    assert other[0].outputs[0].token_ids != alone
    greedy = llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(max_tokens=12, temperature=0))
    assert greedy[0].outputs[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm, prompts):
    greedy = llm.generate({"prompt_token_ids": prompts[4]}, SamplingParams(max_tokens=10, temperature=0))
    want = greedy[0].outputs[0].token_ids
    for params in (SamplingParams(max_tokens=10, temperature=2.0, top_k=1, seed=1),
                   SamplingParams(max_tokens=10, temperature=2.0, top_p=1e-6, seed=2)):
        assert llm.generate({"prompt_token_ids": prompts[4]}, params)[0].outputs[0].token_ids == want


def test_top_k_restricts_choices(llm, prompts):
    params = SamplingParams(max_tokens=30, temperature=5.0, top_k=3, seed=7, logprobs=3)
    c = llm.generate({"prompt_token_ids": prompts[5]}, params)[0].outputs[0]
    assert all(e[t].rank <= 3 for t, e in zip(c.token_ids, c.logprobs))


def test_stop_token_ids_and_eos(llm, prompts):
    base = llm.generate({"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=20, temperature=0))
    ids = base[0].outputs[0].token_ids
    stop_at = ids[5]
    first = ids.index(stop_at)
    c = llm.generate({"prompt_token_ids": prompts[1]},
                     SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))[0].outputs[0]
    assert c.token_ids == ids[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_at
    # the same token as EOS: generation stops there unless ignore_eos
    llm.engine.eos_token_ids = frozenset([stop_at])
    for seq_params, want in ((SamplingParams(max_tokens=20, temperature=0), ids[: first + 1]),
                             (SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), ids)):
        got = llm.generate({"prompt_token_ids": prompts[1]}, seq_params)[0].outputs[0]
        assert got.token_ids == want
        assert got.stop_reason is None  # EOS (or the length) ended it: no stop reason, as in vLLM
    llm.engine.eos_token_ids = frozenset()


def test_stop_string_ends_and_trims(llm):
    base = llm.generate("def f(x):", SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    stop = base.text[8:11]
    c = llm.generate("def f(x):", SamplingParams(max_tokens=30, temperature=0, stop=stop))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == base.text[: base.text.index(stop)]
    assert len(c.token_ids) < len(base.token_ids)
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total  # the worker was told to drop it


def test_validation_errors(llm):
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(logprobs=99),
                dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * (llm.max_model_len + 1)})


def test_unsupported_architecture_names_the_supported_ones(tmp_path, llama_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((llama_dir / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        LLM(model=str(tmp_path), device="cpu")


def test_missing_model_is_a_clear_error():
    with pytest.raises(ValueError, match="never downloads"):
        LLM(model="meta-llama/Llama-3-8B", device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(llama_dir, prompts, dtype):
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=0)
    full = LLM(model=str(llama_dir), device="cpu").generate({"prompt_token_ids": prompts[6]}, params)[0]
    half = LLM(model=str(llama_dir), device="cpu", dtype=dtype).generate({"prompt_token_ids": prompts[6]}, params)[0]
    assert half.outputs[0].token_ids == full.outputs[0].token_ids  # decisive weights: the first token agrees
    t = full.outputs[0].token_ids[0]
    assert half.outputs[0].logprobs[0][t].logprob == pytest.approx(full.outputs[0].logprobs[0][t].logprob, abs=0.1)


def test_tied_embeddings_without_cpu_prepacking(tmp_path, prompts, monkeypatch):
    """A tied LM head where nothing prepacks it (CUDA; fp16 on a CPU without oneDNN's fp16 path) is the
    embedding itself: transformers' tokens. The head used to be None there, and the first logits raised."""
    from dopd.workers import loader

    model_dir = make_random_checkpoint(tmp_path, "qwen2", heads=4, kv_heads=1, tie=True)
    expected, _ = transformers_greedy(model_dir, prompts[:4], 8)
    monkeypatch.setattr(loader, "can_pack", lambda dtype: False)
    llm = LLM(model=str(model_dir), device="cpu")
    assert llm.runner.model.lm_head is None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_mistral_checkpoint_loads(tmp_path, prompts):
    from transformers import MistralConfig, MistralForCausalLM
    import torch

    from dopd.workers.loader import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("tiny"))
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=512,
                           max_position_embeddings=2048, initializer_range=0.25,
                           architectures=["MistralForCausalLM"])
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected, _ = transformers_greedy(tmp_path, prompts[:4], 8)
    llm = LLM(model=str(tmp_path), device="cpu")
    assert llm.max_model_len == 512  # full attention never looks past the sliding window
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.slow
def test_smollm2_greedy_parity_and_words():
    """The real embedded model: same tokens as transformers for 8 chat prompts in one batch."""
    model_dir = resolve_model("smollm2")
    llm = LLM(model="smollm2", device="cpu")
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
                 "Write a haiku about the sea.", "Who wrote Hamlet?", "Say hello in Spanish.",
                 "What is the boiling point of water in Celsius?", "List two programming languages."]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    expected, expected_lp = transformers_greedy(model_dir, prompts, 16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0))
    for out, want, want_lp in zip(outs, expected, expected_lp):
        c = out.outputs[0]
        assert c.token_ids == want
        assert [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)] == pytest.approx(want_lp, abs=1e-4)
    assert "Paris" in outs[0].outputs[0].text
    # ... with the float32 matrices of its GGUF-backed projections freed, where our kernels run (the
    # prefill above, 300 rows, ran on the packed copies, the decode on the blocks); the tied LM head
    # keeps the embedding's.
    model = llm.runner.model
    projections = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    kernels = library() is not None
    assert projections and all((m.blocks is not None and m.weight is None) == kernels for m in projections)
    assert model.lm_head.weight is model.embed_tokens.weight
