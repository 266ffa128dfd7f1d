"""Which worker holds which prompt prefixes, as far as the controller knows: for prefix-aware routing.

An approximate index, fed with the prompts the controller has sent each worker (SGLang's
cache-aware router keeps one like it per worker; Dynamo's KV router learns the exact one from the
workers' KV events, which would take a new message on our pipes). It holds each prompt's full
blocks by their chain hashes (`dopd.kv.blocks.chain_hashes`, the worker's own), at most a worker's
pool of them, and forgets the least recently sent first - a prompt's head after its tail, as the
worker evicts them. Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self) -> None:
        self._held: dict[int, OrderedDict[bytes, None]] = {}

    def record(self, worker: int, hashes: list[bytes], capacity: int) -> None:
        """`worker` was sent a prompt whose full blocks hash to `hashes`; its pool has `capacity` blocks."""
        held = self._held.setdefault(worker, OrderedDict())
        for h in hashes:
            held.pop(h, None)
        held.update(dict.fromkeys(reversed(hashes)))  # the head last: the most recent, the last forgotten
        while len(held) > capacity:
            held.popitem(last=False)

    def cached_blocks(self, hashes: list[bytes]) -> dict[int, int]:
        """For each worker that likely holds some of it, how many of `hashes`, from the first."""
        found = {}
        for worker, held in self._held.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                found[worker] = n
        return found

    def forget(self, worker: int) -> None:
        """The worker's process was lost: its replacement starts with an empty cache."""
        self._held.pop(worker, None)
