"""Integer-only KV block allocator: which blocks of a worker's pool are free.

It knows nothing of tensors, so the scheduler, the simulator and the tests use it as it is.
Freeing a block twice or freeing one never handed out is a bug elsewhere; it raises at once
instead of corrupting the free list.
"""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_total = num_blocks
        # A stack: the most recently freed block is reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        return len(self._used) / self.num_total

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise MemoryError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(num_blocks)]
        self._used.update(ids)
        return ids

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if block_id not in self._used:
                raise ValueError(f"KV block {block_id} freed but not in use")
            self._used.remove(block_id)
            self._free.append(block_id)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
