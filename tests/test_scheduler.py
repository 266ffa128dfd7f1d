"""The batch scheduler and block allocator alone: integers only, no model."""

from __future__ import annotations

import pytest

from dopd.kv.blocks import BlockAllocator
from dopd.sampling_params import SamplingParams
from dopd.scheduler import Scheduler
from dopd.sequence import Sequence, SeqStatus


def seq(rid: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), prompt_len, SamplingParams(max_tokens=max_tokens), max_tokens)


def run_step(s: Scheduler) -> list[tuple[str, int]]:
    """Schedule one step and pretend the forward ran: prefill chunks advance, completed ones sample."""
    batch = s.schedule()
    for q, n in zip(batch.seqs, batch.num_new_tokens):
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens:
            q.append_token(7)
    return [(q.request_id, n) for q, n in zip(batch.seqs, batch.num_new_tokens)]


def test_allocator_rejects_double_free_and_overdraw():
    a = BlockAllocator(4)
    ids = a.allocate(3)
    assert a.num_free == 1 and not a.can_allocate(2)
    with pytest.raises(MemoryError):
        a.allocate(2)
    a.free(ids)
    with pytest.raises(ValueError):
        a.free(ids[:1])
    assert a.num_free == a.num_total == 4


def test_chunked_prefill_splits_a_long_prompt_and_decodes_first():
    s = Scheduler(BlockAllocator(100), block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    s.add(seq("a", 3))
    assert run_step(s) == [("a", 3)]
    s.add(seq("b", 25))
    # the running decode goes first, the long prompt takes the rest of the budget
    assert run_step(s) == [("a", 1), ("b", 9)]
    assert run_step(s) == [("a", 1), ("b", 9)]
    assert run_step(s) == [("a", 1), ("b", 7)]
    assert run_step(s) == [("a", 1), ("b", 1)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = Scheduler(BlockAllocator(100), block_size=4, max_num_seqs=8, max_num_batched_tokens=10, chunked_prefill=False)
    s.add(seq("a", 6))
    s.add(seq("b", 6))
    assert run_step(s) == [("a", 6)]
    assert run_step(s) == [("a", 1), ("b", 6)]


def test_preemption_frees_the_newest_and_recomputes_it():
    s = Scheduler(BlockAllocator(4), block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq("old", 3))  # 2 blocks
    s.add(seq("new", 3))  # 2 blocks
    assert run_step(s) == [("old", 3), ("new", 3)]
    assert s.allocator.num_free == 0
    assert run_step(s) == [("old", 1), ("new", 1)]  # the 4th token of each still fits in 2 blocks
    # "old" needs a third block for its 5th token and none is free: "new" gives way.
    assert run_step(s) == [("old", 1)]
    assert s.num_preemptions == 1
    victim = s.waiting[0]
    assert victim.request_id == "new" and victim.num_computed_tokens == 0 and victim.block_ids == []
    assert victim.num_tokens == 5  # its sampled tokens are kept and recomputed with the prompt


def test_abort_park_and_release_return_every_block():
    s = Scheduler(BlockAllocator(20), block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = seq("a", 9), seq("b", 5), seq("c", 30)
    for q in (a, b, c):
        s.add(q)
    run_step(s)
    s.park(b)
    assert b.status == SeqStatus.PARKED and "b" in s.parked
    assert s.abort("a").finish_reason == "abort"
    assert s.abort("c") is not None  # waiting or running, wherever it is
    assert s.release("b") is b
    assert s.abort("nope") is None
    assert s.allocator.num_free == s.allocator.num_total
