"""The KV pool: one preallocated tensor per worker, block-major.

Layout `[num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]`: a block holds
its tokens' keys and values for *every* layer in one contiguous slab, so handing a block to another
process is one `copy_` per run of consecutive blocks instead of one per layer. Attention sees, per
layer, a strided view `[num_blocks, block_size, num_kv_heads, head_dim]` of keys and one of values.

The tensor is shared once, at start-up (shared memory on CPU, CUDA IPC on GPU); after that only
block ids cross process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVPoolShape:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


class KVPool:
    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dim() != 6 or tensor.shape[2] != 2:
            raise ValueError(f"not a KV pool tensor: shape {tuple(tensor.shape)}")
        self.tensor = tensor

    @classmethod
    def allocate(cls, shape: KVPoolShape, dtype: torch.dtype, device: torch.device | str) -> "KVPool":
        # Zeroed, not empty: attention masks padded slots with -inf, and 0 * NaN from
        # uninitialised memory would still poison the output.
        tensor = torch.zeros(shape.dims, dtype=dtype, device=device)
        if tensor.device.type == "cpu":
            tensor.share_memory_()
        return cls(tensor)

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]

    @property
    def block_size(self) -> int:
        return self.tensor.shape[3]

    @property
    def bytes_per_block(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        kv = self.tensor[:, layer_idx]
        return kv[:, 0], kv[:, 1]

    def copy_blocks_from(self, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy blocks `src[src_ids]` into `self[dst_ids]`; returns when the bytes have landed.

        Runs of consecutive ids on both sides are copied as one slab (block ids handed out by the
        allocator are often consecutive), which is what makes the handoff run near memcpy speed.
        """
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
        if src.shape[1:] != self.tensor.shape[1:] or src.dtype != self.tensor.dtype:
            raise ValueError("source pool has a different block layout")
        for s, d, n in _runs(src_ids, dst_ids):
            self.tensor[d : d + n].copy_(src[s : s + n], non_blocking=True)
        if self.tensor.is_cuda:
            # The ack that follows lets the source free these blocks: the copy must be done.
            torch.cuda.current_stream(self.tensor.device).synchronize()


def _runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
