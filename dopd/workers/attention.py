"""Paged attention backends behind one interface: `prepare(batch)` once per step, `forward` per layer.

The runner orders a step's sequences decodes first (query length 1), then prefills (prompts or
chunks of them, packed without padding). `forward(layer, q, k, v)` writes the new keys and values
into the pool and attends over each sequence's whole KV through its block table.

- `torch`: runs everywhere; the reference the other backend is checked against.
- `flashinfer`: CUDA only; `BatchDecodeWithPagedKVCacheWrapper` for the decodes and
  `BatchPrefillWithPagedKVCacheWrapper` for the prefills, each planned once per step and reused by
  every layer. Imported lazily, so the control plane never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dopd.kv.pool import KVPool
from dopd.workers.cpu_kernels import library

BACKENDS = ("torch", "flashinfer")


@dataclass(slots=True)
class AttentionBatch:
    """The sequences of one step, in packed order, decodes first."""

    q_lens: list[int]
    kv_lens: list[int]  # KV length after this step: cached + new tokens
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [num_tokens] flat slot = block_id * block_size + offset
    num_decodes: int


class TorchAttention:
    """Attention in plain torch over the block-major pool.

    New keys and values are written row by row through one contiguous 2-D view of the pool
    (a row per block, layer, k|v and slot). Reads gather whole blocks through another contiguous
    2-D view, a row per block, layer and k|v: `index_select` on a contiguous source copies each
    block as one run, at copy speed. On the strided view `[num_blocks, ...]` of one layer it took a
    slow element-wise path, 4-5x slower, and was two thirds of a decode step at 700 tokens of context.

    Where our CPU kernels run (cpu_kernels.py), decodes skip the gather: `csrc/decode_attention.cpp`
    reads each sequence's keys and values in place through its block table. A batch of 16 short
    decodes spent ~12 ms a step (of a 135M model's ~60) in the gathers, SDPA and their reshapes.
    """

    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.pool = pool
        self.scale = head_dim**-0.5
        self.gqa = num_heads != num_kv_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        t = pool.tensor
        self.rows = t.view(-1, num_kv_heads * head_dim)
        self.num_layers = t.shape[1]
        self.block_rows = t.view(t.shape[0] * self.num_layers * 2, -1)  # row (block * layers + layer) * 2 + k|v
        kernels = library() if t.dtype == torch.float32 and not t.is_cuda else None
        fits = kernels is not None and kernels.dopd_paged_decode_attention_supports(num_heads // num_kv_heads, head_dim)
        self.kernels = kernels if fits else None

    def prepare(self, batch: AttentionBatch) -> None:
        device = self.pool.tensor.device
        bs = self.pool.block_size
        slots = batch.slot_mapping
        blocks = torch.div(slots, bs, rounding_mode="floor")
        self.write_rows = blocks * (self.num_layers * 2 * bs) + slots % bs  # layer 0's keys
        n = self.num_decodes = batch.num_decodes
        if n:
            width = max(len(t) for t in batch.block_tables[:n])
            tables = [t + [0] * (width - len(t)) for t in batch.block_tables[:n]]
            if self.kernels is not None:
                self.decode_tables = torch.tensor(tables, dtype=torch.int32)
                self.decode_lens = torch.tensor(batch.kv_lens[:n], dtype=torch.int32)
        if n and self.kernels is None:
            self.decode_rows = torch.tensor(tables, device=device).flatten() * (2 * self.num_layers)
            # Gathered into the same two buffers by every layer: a fresh 10-MB tensor per layer cost
            # more in page faults than the copy itself.
            self.decode_kv = (self.block_rows.new_empty(len(self.decode_rows), self.block_rows.shape[1]),
                              self.block_rows.new_empty(len(self.decode_rows), self.block_rows.shape[1]))
            self.decode_width = width * bs
            kv_lens = torch.tensor(batch.kv_lens[:n], device=device)
            positions = torch.arange(width * bs, device=device)
            self.decode_mask = (positions[None, :] < kv_lens[:, None])[:, None, None, :]
        # Prefills: (first query row, query length, kv length, its block rows or None, mask or None).
        self.prefills = []
        start = n
        for q_len, kv_len, table in zip(batch.q_lens[n:], batch.kv_lens[n:], batch.block_tables[n:]):
            rows = mask = None
            if kv_len != q_len:  # a chunk on top of cached tokens: read them back, bottom-right causal mask
                rows = torch.tensor(table, device=device) * (2 * self.num_layers)
                positions = torch.arange(kv_len, device=device)
                query_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
                mask = positions[None, :] <= query_pos
            self.prefills.append((start, q_len, kv_len, rows, mask))
            start += q_len

    def _gather(self, layer: int, block_rows: torch.Tensor,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks whose layer-0 key rows are `block_rows`,
        `[len(block_rows) * block_size, kv_heads, head_dim]` each (into `out` if given)."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        k_out, v_out = out or (None, None)
        keys = torch.index_select(self.block_rows, 0, block_rows + 2 * layer, out=k_out).view(shape)
        values = torch.index_select(self.block_rows, 0, block_rows + (2 * layer + 1), out=v_out).view(shape)
        return keys, values

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        model_dtype = q.dtype  # on CPU the pool (and attention) stay float32 under half-precision weights
        q, k, v = (x.to(self.rows.dtype) for x in (q, k, v))
        k_rows = self.write_rows + 2 * layer * self.pool.block_size
        self.rows.index_copy_(0, k_rows, k.reshape(k.shape[0], -1))
        self.rows.index_copy_(0, k_rows + self.pool.block_size, v.reshape(v.shape[0], -1))
        out = torch.empty_like(q)
        n = self.num_decodes
        if n and self.kernels is not None:
            self._decode_in_place(layer, q[:n].contiguous(), out)
        elif n:
            keys, values = self._gather(layer, self.decode_rows, self.decode_kv)
            keys = keys.view(n, self.decode_width, self.num_kv_heads, self.head_dim).transpose(1, 2)
            values = values.view(n, self.decode_width, self.num_kv_heads, self.head_dim).transpose(1, 2)
            # Each KV head's group of query heads is one query "sequence" over it: the keys and
            # values are read once per KV head, not once per query head (~30% faster than enable_gqa).
            group = q.shape[1] // self.num_kv_heads
            o = F.scaled_dot_product_attention(
                q[:n].view(n, self.num_kv_heads, group, self.head_dim), keys, values, attn_mask=self.decode_mask,
                scale=self.scale,
            )
            out[:n] = o.reshape(n, -1, self.head_dim)
        for start, q_len, kv_len, rows, mask in self.prefills:
            span = slice(start, start + q_len)
            if rows is None:  # a whole prompt: its keys are the ones just computed
                keys, values = k[span], v[span]
            else:
                keys, values = self._gather(layer, rows)
                keys, values = keys[:kv_len], values[:kv_len]
            o = F.scaled_dot_product_attention(
                q[span].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
                scale=self.scale, enable_gqa=self.gqa,
            )
            out[span] = o.squeeze(0).transpose(0, 1)
        return out.to(model_dtype)

    def _decode_in_place(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        t = self.pool.tensor
        status = self.kernels.dopd_paged_decode_attention(
            q.data_ptr(), t.data_ptr(), self.num_layers, layer, self.pool.block_size, self.num_kv_heads,
            q.shape[1] // self.num_kv_heads, self.head_dim, self.decode_tables.data_ptr(), self.decode_tables.shape[1],
            self.decode_lens.data_ptr(), q.shape[0], self.scale, out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"decode attention kernel refused the shape (status {status})")


class FlashInferAttention:
    WORKSPACE_BYTES = 128 * 1024 * 1024

    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        import flashinfer  # CUDA only; imported here so that nothing else needs it

        self.pool = pool
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        device = pool.tensor.device
        # Separate workspaces: both wrappers are planned before either runs.
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device), "NHD",
            use_tensor_cores=num_heads // num_kv_heads >= 4,
        )
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device), "NHD"
        )

    def prepare(self, batch: AttentionBatch) -> None:
        device = self.pool.tensor.device
        bs = self.pool.block_size
        self.slot_blocks = torch.div(batch.slot_mapping, bs, rounding_mode="floor")
        self.slot_offsets = batch.slot_mapping % bs
        n = self.num_decodes = batch.num_decodes
        self.num_prefill_rows = sum(batch.q_lens[n:])
        dtype = self.pool.tensor.dtype
        # The shape goes positionally: the prefill plan names its head dim head_dim_qk, the decode plan head_dim.
        shape = (self.num_heads, self.num_kv_heads, self.head_dim, bs)
        if n:
            indptr, indices, last = _page_table(batch.block_tables[:n], batch.kv_lens[:n], bs, device)
            self.decode_wrapper.plan(indptr, indices, last, *shape, q_data_type=dtype, kv_data_type=dtype)
        if len(batch.q_lens) > n:
            indptr, indices, last = _page_table(batch.block_tables[n:], batch.kv_lens[n:], bs, device)
            qo_indptr = torch.tensor([0] + batch.q_lens[n:], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.prefill_wrapper.plan(qo_indptr.to(device), indptr, indices, last, *shape, causal=True,
                                      q_data_type=dtype, kv_data_type=dtype)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.pool.layer(layer)
        k_cache[self.slot_blocks, self.slot_offsets] = k
        v_cache[self.slot_blocks, self.slot_offsets] = v
        # q comes as a view of the fused q|k projection; the kernels get it dense (a copy of a few MB at most).
        q = q.contiguous()
        out = torch.empty_like(q)
        n = self.num_decodes
        if n:
            out[:n] = self.decode_wrapper.run(q[:n], (k_cache, v_cache))
        if self.num_prefill_rows:
            out[n:] = self.prefill_wrapper.run(q[n:], (k_cache, v_cache))
        return out


def _page_table(tables: list[list[int]], kv_lens: list[int], block_size: int, device) -> tuple[torch.Tensor, ...]:
    """FlashInfer's CSR page table: indptr, page indices, and the filled length of each last page."""
    pages = [t[: -(-kv // block_size)] for t, kv in zip(tables, kv_lens)]
    indptr = torch.tensor([0] + [len(p) for p in pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    indices = torch.tensor([b for p in pages for b in p], dtype=torch.int32)
    last = torch.tensor([kv - (len(p) - 1) * block_size for p, kv in zip(pages, kv_lens)], dtype=torch.int32)
    return indptr.to(device), indices.to(device), last.to(device)


def make_attention(name: str, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
    if name == "torch":
        return TorchAttention(pool, num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        if not pool.tensor.is_cuda:
            raise ValueError("the flashinfer attention backend needs a CUDA device; use --engine torch on CPU")
        return FlashInferAttention(pool, num_heads, num_kv_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
