"""GGUF block weights: parsing GGUF's bytes, the packed CPU kernel, and the embedded model's blocks."""

from __future__ import annotations

import pytest
import torch

from conftest import random_blocks
from dopd.workers import gguf
from dopd.workers.cpu_kernels import library

needs_kernel = pytest.mark.skipif(library() is None, reason="our CPU kernels need AVX-512 and g++ (test_cpu_kernels.py fails if they should build)")


def q4_1_bytes(d: float, m: float, codes: list[int]) -> bytes:
    """One Q4_1 block as llama.cpp writes it: float16 d, float16 m, then 16 bytes of nibble pairs."""
    packed = bytes(codes[j] | (codes[j + 16] << 4) for j in range(16))
    return torch.tensor([d, m], dtype=torch.float16).numpy().tobytes() + packed


def test_q4_1_parse_follows_ggufs_nibble_order():
    codes = list(range(16)) + [15 - j for j in range(16)]
    raw = torch.frombuffer(bytearray(q4_1_bytes(0.5, -2.0, codes) * 2), dtype=torch.uint8).reshape(1, 40)
    w = gguf.Blocks.parse("q4_1", raw).dequantize()
    assert w.shape == (1, 64)
    assert w[0, :32].tolist() == [0.5 * q - 2.0 for q in codes]
    assert torch.equal(w[0, :32], w[0, 32:])


def test_q8_0_parse():
    codes = [j - 16 for j in range(32)]
    raw = torch.tensor([0.25], dtype=torch.float16).numpy().tobytes() + bytes(c & 0xFF for c in codes)
    w = gguf.Blocks.parse("q8_0", torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(1, 34)).dequantize()
    assert w[0].tolist() == [0.25 * c for c in codes]


def test_unsupported_block_type_is_named():
    with pytest.raises(ValueError, match="supported: q4_1, q8_0"):
        gguf.Blocks.parse("q5_k", torch.zeros(1, 22, dtype=torch.uint8))


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows_of_x", [1, 3, 8, 16, 17, 32])
def test_packed_matmul_equals_float32_matmul(kind, rows_of_x):
    blocks = random_blocks(kind, 96, 160)
    x = torch.randn(rows_of_x, 160, generator=torch.Generator().manual_seed(1))
    expected = x @ blocks.dequantize().T
    got = gguf.PackedWeight(blocks).matmul(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_blocks_keep_row_order():
    parts = [random_blocks("q4_1", 32, 64, seed=s) for s in range(3)]
    x = torch.randn(4, 64)
    got = gguf.PackedWeight(gguf.Blocks.cat(parts)).matmul(x)
    torch.testing.assert_close(got, torch.cat([x @ p.dequantize().T for p in parts], dim=1), rtol=1e-5, atol=1e-5)


def test_a_weight_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="does not tile"):
        gguf.PackedWeight(random_blocks("q4_1", 24, 64))


@pytest.mark.slow
def test_embedded_blocks_are_the_checkpoints_weights():
    """Every projection and the tied head of the embedded SmolLM2, as saved in blocks, dequantises to
    the float32 checkpoint bit for bit (rows included: llama.cpp permutes q and k)."""
    from safetensors.torch import load_file

    from dopd.embedded import resolve_model

    model_dir = resolve_model("smollm2")
    weights = load_file(model_dir / "model.safetensors")
    from safetensors import safe_open

    with safe_open(model_dir / gguf.BLOCKS_FILE, framework="pt") as f:
        kinds = f.metadata()
        names = sorted(f.keys())
        assert len(names) == 30 * 7 + 1
        for name in names:
            assert torch.equal(gguf.Blocks.parse(kinds[name], f.get_tensor(name)).dequantize(), weights[name]), name


@needs_kernel
@pytest.mark.slow
def test_embedded_model_decodes_through_blocks():
    """The loader gives every projection and the LM head its blocks; logits agree with float32's."""
    from dopd.embedded import resolve_model
    from dopd.workers.loader import load_arch, load_model
    from dopd.workers.model import Linear

    model_dir = resolve_model("smollm2")
    model = load_model(model_dir, load_arch(model_dir), torch.float32, torch.device("cpu"), 256)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 30 * 4 + 1 and all(m.blocks is not None for m in linears)
    hidden = torch.randn(16, 576)
    with_blocks = model.logits(hidden)
    for m in linears:
        m.blocks = None
    torch.testing.assert_close(with_blocks, model.logits(hidden), rtol=1e-4, atol=1e-4)
