"""Per-worker batch scheduler: which sequences run in the next engine step, and how many tokens each.

Pure bookkeeping over integers (a `BlockAllocator`), no tensors and no I/O, so the real worker,
the mock worker and the virtual-clock simulator all batch with this same code.

Each step, in vLLM v1's order:
1. Running sequences first (decodes, and prefills that were chunked), oldest first. A sequence that
   needs a new block when none is free preempts the newest running sequence (recompute: its blocks
   are freed and it goes back to the head of the waiting queue).
2. Then waiting sequences, first come first served, while the token budget, the sequence cap and
   the free blocks allow. With chunked prefill a long prompt takes what is left of the budget and
   continues next step; without it a prompt is admitted whole or not at all.

With prefix caching a prompt is admitted with the longest run of its full blocks the pool already
holds (shared, so those tokens are not computed again) - never the block of its last token, whose
logits are needed. Every block a step will fill is registered when the step is scheduled, not after
it: a prompt admitted later in the same step can share it, because attention writes a layer's new
keys and values for the whole batch before any sequence reads them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dopd.kv.blocks import BlockAllocator, blocks_needed, chain_hashes, num_shareable_blocks
from dopd.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool = True,
        prefix_caching: bool = False,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ---- queue state -------------------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, block_ids: list[int]) -> None:
        """Admit a sequence whose KV is already in `block_ids` (adopted from another worker)."""
        seq.block_ids = block_ids
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pending = len(seq.token_ids) - seq.num_computed_tokens
            num_new = pending if pending < budget else budget
            if not self.chunked_prefill and num_new < pending:
                break
            while not self._grow(seq, num_new):
                victim = self.running.pop()  # the newest sequence gives way
                self._preempt(victim)
                preempted = True
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self._take(batch, seq, num_new)
                budget -= num_new
                i += 1
                continue
            break  # `seq` itself was preempted: everything after it already was too

        # After a preemption, memory is short: admitting more would only thrash.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_pending_tokens, budget)
            if self.prefix_caching and not seq.block_ids:
                self._share_cached_prefix(seq)
                num_new = min(seq.num_pending_tokens, budget)
            if not self.chunked_prefill and num_new < seq.num_pending_tokens:
                self._unshare(seq)
                break
            if not self._grow(seq, num_new):
                self._unshare(seq)
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._take(batch, seq, num_new)
            budget -= num_new
        return batch

    def _take(self, batch: ScheduledBatch, seq: Sequence, num_new: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
        if self.prefix_caching:  # at once: a prompt admitted after it in this step may share them
            self._register_full_blocks(seq, seq.num_computed_tokens + num_new)

    # ---- prefix caching ------------------------------------------------------------------------

    def _share_cached_prefix(self, seq: Sequence) -> None:
        bs = self.block_size
        hashes = chain_hashes(seq.token_ids, bs, seq.block_hashes, num_shareable_blocks(seq.num_tokens, bs))
        seq.block_ids = self.allocator.lookup(hashes)
        self.allocator.share(seq.block_ids)
        seq.num_registered_blocks = len(seq.block_ids)
        seq.num_computed_tokens = len(seq.block_ids) * bs

    def _unshare(self, seq: Sequence) -> None:
        """Undo `_share_cached_prefix` for a sequence that is not admitted after all."""
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
        seq.block_ids, seq.num_registered_blocks, seq.num_computed_tokens = [], 0, 0

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that hold full blocks of KV once `num_tokens` tokens are computed."""
        num_full = num_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = chain_hashes(seq.token_ids, self.block_size, seq.block_hashes, num_full)
        first = seq.num_registered_blocks
        self.allocator.register(seq.block_ids[first:num_full], hashes[first:num_full])
        seq.num_registered_blocks = num_full

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Give `seq` the blocks for `num_new` more tokens of KV, if they are free."""
        total = seq.num_computed_tokens + num_new
        if total <= len(seq.block_ids) * self.block_size:  # the common case, checked cheaply
            return True
        need = blocks_needed(total, self.block_size) - len(seq.block_ids)
        if not self.allocator.can_allocate(need):
            return False
        seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = seq.num_registered_blocks = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after a step ------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def park(self, seq: Sequence) -> None:
        """Stop scheduling `seq` but keep its blocks: another worker will pull them."""
        self.running.remove(seq)
        seq.status = SeqStatus.PARKED
        self.parked[seq.request_id] = seq

    def resume(self, request_id: str) -> Sequence | None:
        """Schedule a parked sequence again, here, with the blocks it has."""
        seq = self.parked.pop(request_id, None)
        if seq is not None:
            seq.hand_off = False
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return seq

    def release(self, request_id: str) -> Sequence | None:
        """Free a parked sequence's blocks (its handoff completed or was abandoned)."""
        seq = self.parked.pop(request_id, None)
        if seq is not None:
            self._release(seq)
            seq.status = SeqStatus.FINISHED
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; its blocks return to the pool."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    seq.status = SeqStatus.FINISHED
                    seq.finish_reason = seq.finish_reason or "abort"
                    return seq
        return self.release(request_id)

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
