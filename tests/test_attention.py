"""The CPU decode-attention kernel against the torch path it replaces, over the same paged pool."""

from __future__ import annotations

import pytest
import torch

from dopd.kv.pool import KVPool, KVPoolShape
from dopd.workers.attention import AttentionBatch, TorchAttention
from dopd.workers.cpu_kernels import library

pytestmark = pytest.mark.skipif(library() is None, reason="our CPU kernels need AVX-512 and g++")


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("num_seqs", [1, 6])  # the kernel splits a sequence's heads over threads, or not
def test_decode_kernel_matches_torch(block_size, heads, kv_heads, head_dim, num_seqs):
    g = torch.Generator().manual_seed(0)
    kv_lens = [100, 15, 16, 17, 1, 3][:num_seqs]
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 4
    pool = KVPool.allocate(KVPoolShape(num_blocks, 2, block_size, kv_heads, head_dim), torch.float32, "cpu")
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g))
    # Block tables from a shuffled pool, so that a sequence's blocks are not consecutive.
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in kv_lens]
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, kv_lens)])
    batch = AttentionBatch(q_lens=[1] * len(kv_lens), kv_lens=kv_lens, block_tables=tables, slot_mapping=slots,
                           num_decodes=len(kv_lens))
    q = torch.randn(len(kv_lens), heads, head_dim, generator=g) * 2
    k = torch.randn(len(kv_lens), kv_heads, head_dim, generator=g)
    v = torch.randn(len(kv_lens), kv_heads, head_dim, generator=g)
    outs = []
    for use_kernel in (True, False):
        attn = TorchAttention(pool, heads, kv_heads, head_dim)
        assert attn.kernels is not None
        if not use_kernel:
            attn.kernels = None
        attn.prepare(batch)
        outs.append(attn.forward(1, q, k, v))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
