"""Our CPU kernels build wherever they can run, and the fused layer ops equal the torch ops they replace."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from dopd.workers import cpu_kernels
from dopd.workers.model import RMSNorm, apply_rotary

can_run = "avx512f" in cpu_kernels._cpu_flags() and shutil.which("g++") is not None
turned_off = os.environ.get("DOPD_CPU_KERNELS", "1") == "0"  # the torch-only path, asked for
needs_kernels = pytest.mark.skipif(not can_run or turned_off, reason="our CPU kernels need AVX-512 and g++ "
                                                                     "(and not DOPD_CPU_KERNELS=0)")


@needs_kernels
def test_kernels_build_on_a_machine_that_can_run_them():
    # Every kernel test below skips when the library is missing: a compile error must fail here.
    assert cpu_kernels.library() is not None


@pytest.fixture
def ops():
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("our CPU kernels need AVX-512 and g++")
    return cpu_kernels.LayerOps(lib)


@pytest.mark.parametrize("rows,dim", [(1, 64), (16, 576), (9, 100)])
def test_add_rms_norm(ops, rows, dim):
    x, add = torch.randn(rows, dim) * 3, torch.randn(rows, dim)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data.normal_()
    residual, out = ops.add_rms_norm(x, add, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(residual, x + add, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(x + add), rtol=1e-5, atol=1e-5)
    same, out2 = ops.add_rms_norm(x, None, norm.weight.detach(), 1e-5)
    assert same is x
    torch.testing.assert_close(out2, norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64, 40])
def test_rotary_in_place(ops, head_dim):
    rows, heads, extra = 7, 5, 3  # the last `extra` heads of a row (v) are left alone
    x = torch.randn(rows, (heads + extra) * head_dim)
    angles = torch.randn(rows, head_dim // 2)
    cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    want = x.clone()
    rotated = apply_rotary(want[:, : heads * head_dim].view(rows, heads, head_dim), cos[:, None], sin[:, None])
    want[:, : heads * head_dim] = rotated.reshape(rows, -1)
    ops.rotary_(x, heads, head_dim, cos, sin)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


def test_silu_mul(ops):
    gate_up = torch.randn(5, 2 * 200) * 8  # exp's range: large gates of either sign
    gate, up = gate_up.split(200, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
