"""A decode step's layers in one C++ call each give the same bits as the layer-by-layer modules."""

from __future__ import annotations

import pytest
import torch

from conftest import random_blocks
from dopd.kv.pool import KVPool, KVPoolShape
from dopd.workers import gguf
from dopd.workers.attention import AttentionBatch, TorchAttention
from dopd.workers.cpu_kernels import LayerOps, library
from dopd.workers.model import CausalLM, Linear, ModelArch

pytestmark = pytest.mark.skipif(library() is None, reason="our CPU kernels need AVX-512 and g++")


def blocks_model(kind: str, qkv_bias: bool = False) -> CausalLM:
    """A 3-layer Llama whose every projection is random GGUF blocks (and its float32 weight the same matrix)."""
    arch = ModelArch("LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=3,
                     num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                     rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    model = CausalLM(arch, 512, torch.float32).eval()
    for p in model.parameters():
        if p.dim() == 1:  # norms and biases: away from 1 and 0, so that they count
            p.data.uniform_(0.5, 1.5)
    for i, module in enumerate(m for m in model.modules() if isinstance(m, Linear)):
        blocks = random_blocks(kind, module.out_features, module.in_features, seed=i)
        module.weight.data.copy_(blocks.dequantize() * 20)  # * 20: activations that do not fade in 3 layers
        blocks = gguf.Blocks(blocks.kind, blocks.q, blocks.d * 20, None if blocks.m is None else blocks.m * 20)
        module.blocks = gguf.PackedWeight(blocks)
    model.use_cpu_kernels(LayerOps(library()))
    model.use_fused_decode()
    return model


def decode_step(model: CausalLM, fused: bool, kv_lens: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of sequences with `kv_lens` tokens (the last one new) over a random pool:
    the final hidden states, and the pool after it."""
    arch = model.arch
    g = torch.Generator().manual_seed(1)
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 3
    pool = KVPool.allocate(KVPoolShape(num_blocks, arch.num_layers, block_size, arch.num_kv_heads, arch.head_dim),
                           torch.float32, "cpu")
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g))
    free = torch.randperm(num_blocks, generator=g).tolist()  # a sequence's blocks not consecutive
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in kv_lens]
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, kv_lens)])
    attn = TorchAttention(pool, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    attn.prepare(AttentionBatch([1] * len(kv_lens), kv_lens, tables, slots, len(kv_lens)))
    saved, model.fused_decode = model.fused_decode, model.fused_decode if fused else None
    try:
        tokens = torch.randint(0, arch.vocab_size, (len(kv_lens),), generator=g)
        hidden = model(tokens, torch.tensor(kv_lens) - 1, attn)
    finally:
        model.fused_decode = saved
    return hidden, pool.tensor


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("block_size", [1, 16, 128])  # the block sizes the engine parity tests cover
def test_fused_decode_step_is_bit_equal(kind, block_size):
    model = blocks_model(kind)
    assert model.fused_decode is not None
    kv_lens = [1, 17, 16, 40, 3, 100, 2, 33, 64]
    fused_hidden, fused_pool = decode_step(model, True, kv_lens, block_size)
    hidden, pool = decode_step(model, False, kv_lens, block_size)
    assert torch.isfinite(hidden).all() and hidden.abs().mean() > 0.1  # not a state every path agrees on trivially
    assert torch.equal(fused_hidden, hidden)
    assert torch.equal(fused_pool, pool)  # the new keys and values written to the same slots


def test_fused_decode_serves_decode_steps_only():
    model = blocks_model("q4_1")
    pool = KVPool.allocate(KVPoolShape(8, 3, 16, 2, 16), torch.float32, "cpu")
    attn = TorchAttention(pool, 6, 2, 16)
    attn.prepare(AttentionBatch([1, 5], [9, 5], [[0], [1]], torch.tensor([8, 16, 17, 18, 19, 20]), 1))
    assert not model.fused_decode.serves(attn, 6)  # a prefill rides along: the modules take it
    attn.prepare(AttentionBatch([1, 1], [9, 5], [[0], [1]], torch.tensor([8, 20]), 2))
    assert model.fused_decode.serves(attn, 2)


def test_a_model_with_biases_keeps_the_modules():
    assert blocks_model("q4_1", qkv_bias=True).fused_decode is None
