"""Shared fixtures: small random-weight checkpoints made here, offline, with transformers' own classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the user's cache: embedded models are built once per session in a temp dir,
# unless DOPD_CACHE is set (CI sets it to keep the SmolLM2 conversion between steps).
if "DOPD_CACHE" not in os.environ:
    os.environ["DOPD_CACHE"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "dopd-test-cache")


def make_checkpoint(path: Path, arch: str = "llama", *, hidden: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 256, tie: bool = False, init_range: float = 0.25,
                    seed: int = 0, **extra) -> Path:
    """A random-weight Llama or Qwen2 checkpoint with the tiny BPE tokenizer, saved as safetensors.

    `init_range` is large on purpose: with near-uniform logits greedy choices hinge on the last bit
    and two correct implementations may disagree.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dopd.embedded import resolve_model
    from dopd.workers.loader import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("tiny"))
    cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cls_config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=tie, initializer_range=init_range, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, architectures=[cls_model.__name__], **extra,
    )
    torch.manual_seed(seed)
    model = cls_model(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' generate(do_sample=False), one prompt at a time (no padding), never stopping at EOS;
    plus the chosen tokens' logprobs from its float32 logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        new = out.sequences[0, len(ids):].tolist()
        lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
        tokens.append(new)
        logprobs.append(lps)
    return tokens, logprobs


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", heads=4, kv_heads=2, tie=False)


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Twelve prompts of different lengths (3 to 200 tokens) over the tiny vocabulary."""
    import random

    rng = random.Random(1)
    return [[rng.randrange(5, 4096) for _ in range(n)] for n in (3, 7, 12, 20, 33, 48, 64, 90, 117, 150, 180, 200)]


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0):
    """A random weight in GGUF blocks (gguf.Blocks) whose scales are exact float16s, as in a real file."""
    import torch

    from dopd.workers import gguf

    g = torch.Generator().manual_seed(seed)
    groups = cols // gguf.BLOCK
    d = (torch.rand(rows, groups, generator=g) * 0.02).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        return gguf.Blocks(kind, q, d, (-torch.rand(rows, groups, generator=g) * 0.1).half().float())
    return gguf.Blocks(kind, torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8), d, None)
