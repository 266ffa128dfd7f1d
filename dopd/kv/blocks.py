"""Integer-only KV block allocator: which blocks of a worker's pool are free, and which hold a prefix.

It knows nothing of tensors, so the scheduler, the simulator and the tests use it as it is.
Freeing a block more often than it was handed out is a bug elsewhere; it raises at once instead
of corrupting the free list.

Prefix caching (vLLM's automatic prefix caching): a full block of KV can be registered under the
hash of its tokens and of every token before them (`chain_hashes`). A later sequence whose prompt
starts the same way `share`s those blocks, ref-counted, instead of computing them again. A freed
registered block keeps its KV and its hash and stays findable until it is evicted, which happens
only when a block is needed and no never-registered block is free, least recently freed first.
Both kinds count as free, so an idle pool is whole exactly when `num_free == num_total`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_total = num_blocks
        # Free and never registered: a stack, so the most recently freed block is reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Free but registered, in the order they were freed: eviction takes the oldest.
        # (An OrderedDict: a plain dict's first key is O(n) to find after many deletions at the front.)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered under a prefix hash, in use or not."""
        return len(self._hash_of)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_total

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free:
            raise MemoryError(f"asked for {num_blocks} KV blocks, {self.num_free} free")
        # Per block in Python, so kept lean: a 12k-token prompt is 750 blocks, and the simulator
        # admits thousands of them.
        free, refs = self._free, self._refs
        take = min(num_blocks, len(free))
        ids = free[len(free) - take:][::-1]  # pop order: the top of the stack first
        del free[len(free) - take:]
        for _ in range(num_blocks - take):
            block_id, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block_id)]
            ids.append(block_id)
        for block_id in ids:
            refs[block_id] = 1
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. A sequence's blocks go last first, so that when the
        cache evicts, a prompt's tail goes before the prefix that other prompts may share."""
        refs, registered = self._refs, self._hash_of
        for block_id in reversed(block_ids):
            if not 0 <= block_id < self.num_total or refs[block_id] == 0:
                raise ValueError(f"KV block {block_id} freed but not in use")
            refs[block_id] -= 1
            if refs[block_id] == 0:
                if block_id in registered:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # ---- prefix caching ------------------------------------------------------------------------

    def reset_cache(self) -> bool:
        """Forget every registered prefix; only when no block is in use (False otherwise), as vLLM's."""
        if self.num_used:
            return False
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()
        return True

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest cached run of `hashes` from the first one."""
        found = []
        for h in hashes:
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def share(self, block_ids: list[int]) -> None:
        """Take one more reference to each of these registered blocks (from `lookup`)."""
        for block_id in block_ids:
            if block_id not in self._hash_of:
                raise ValueError(f"KV block {block_id} shared but holds no cached prefix")
            if self._refs[block_id] == 0:
                del self._evictable[block_id]
            self._refs[block_id] += 1

    def register(self, block_ids: list[int], block_hashes: list[bytes]) -> None:
        """Make in-use blocks findable under their hashes. A block already registered, or a hash
        some other block already holds (the same prefix computed twice), is left as it is."""
        refs, hash_of, block_of = self._refs, self._hash_of, self._block_of
        for block_id, block_hash in zip(block_ids, block_hashes):
            if refs[block_id] == 0:
                raise ValueError(f"KV block {block_id} registered but not in use")
            if block_id not in hash_of and block_hash not in block_of:
                hash_of[block_id] = block_hash
                block_of[block_hash] = block_id


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def num_shareable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """How many of a prompt's blocks may come from the prefix cache: its full blocks, less the one
    holding its last token, whose logits must be computed."""
    return (num_prompt_tokens - 1) // block_size


def chain_hashes(token_ids, block_size: int, hashes: list[bytes], num_blocks: int) -> list[bytes]:
    """Extend `hashes` (those of the first full blocks of `token_ids`) to `num_blocks` entries.

    Block i's hash covers its tokens and, through block i-1's hash, every token before them: equal
    hashes mean equal prefixes. SHA-256, as vLLM moved to: with Python's 64-bit `hash()` a crafted
    prompt could collide with another tenant's prefix and read its KV.
    """
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else b""
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        hashes.append(hashlib.sha256(parent + tokens).digest())
    return hashes
