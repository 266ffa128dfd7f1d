"""Prefix caching: the allocator's ref-counted, hash-registered blocks, the scheduler's sharing of
them, and the engine's tokens, which must not change whether a prefix is computed or shared."""

from __future__ import annotations

import pytest

from dopd import LLM, SamplingParams
from dopd.kv.blocks import BlockAllocator, chain_hashes
from dopd.messages import Role
from dopd.policy.prefix_index import PrefixIndex
from dopd.policy.routing import WorkerView, pick_prefill_worker, place_prompt
from dopd.sampling_params import SamplingParams as Params
from dopd.scheduler import Scheduler
from dopd.sequence import Sequence
from dopd.testing import transformers_greedy

# ---- allocator ---------------------------------------------------------------------------------


def test_chain_hash_covers_the_whole_prefix():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, [], 2)
    b = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, [], 2)
    c = chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4, [], 2)
    assert a == b and len(a) == 2
    assert c[0] != a[0] and c[1] != a[1]  # block 1's tokens are equal, its prefix is not
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, a[:1], 2) == a  # extends what it is given


def test_a_freed_registered_block_stays_findable_until_evicted_last():
    a = BlockAllocator(4)
    h = chain_hashes(list(range(8)), 4, [], 2)
    blocks = a.allocate(2)
    a.register(blocks, h)
    a.free(blocks)
    assert a.num_free == a.num_total and a.num_cached == 2
    # Two never-registered blocks are free: they go first, the cached prefix survives.
    other = a.allocate(2)
    assert set(other).isdisjoint(blocks) and a.lookup(h) == blocks
    # Now one more block must evict: the tail of the prefix goes before its head.
    a.allocate(1)
    assert a.lookup(h) == blocks[:1] and a.num_cached == 1


def test_shared_blocks_are_ref_counted():
    a = BlockAllocator(3)
    h = chain_hashes(list(range(4)), 4, [], 1)
    (block,) = a.allocate(1)
    a.register([block], h)
    assert a.lookup(h) == [block]
    a.share([block])
    a.free([block])
    assert a.num_free == 2  # still held once
    a.free([block])
    assert a.num_free == 3
    with pytest.raises(ValueError):
        a.free([block])
    a.share(a.lookup(h))  # a free cached block can be taken back
    assert a.num_free == 2
    (plain,) = a.allocate(1)
    with pytest.raises(ValueError):
        a.share([plain])  # holds no registered prefix


def test_the_same_prefix_registered_twice_keeps_the_first():
    a = BlockAllocator(2)
    h = chain_hashes([5, 6], 2, [], 1)
    first, second = a.allocate(2)
    a.register([first, second], h * 2)
    assert a.lookup(h) == [first] and a.num_cached == 1
    a.free([first, second])
    assert a.num_free == 2


# ---- scheduler ---------------------------------------------------------------------------------

def make_seq(rid: str, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), Params(max_tokens=max_tokens), max_tokens)


def scheduler(num_blocks: int = 64, budget: int = 512, caching: bool = True) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), block_size=4, max_num_seqs=8, max_num_batched_tokens=budget,
                     prefix_caching=caching)


def step(s: Scheduler) -> dict[str, int]:
    """Schedule one step and pretend it ran; {request: tokens computed this step}."""
    batch = s.schedule()
    for q, n in zip(batch.seqs, batch.num_new_tokens):
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens and q.append_token(99):
            s.finish(q)
    return {q.request_id: n for q, n in zip(batch.seqs, batch.num_new_tokens)}


SYSTEM = list(range(100, 110))  # 10 tokens: two full blocks of 4 and half of a third


def test_prompts_admitted_in_one_step_share_a_prefix_as_it_is_computed():
    s = scheduler()
    a, b = make_seq("a", SYSTEM + [1, 2, 3]), make_seq("b", SYSTEM + [4, 5])
    s.add(a)
    s.add(b)
    assert step(s) == {"a": 13, "b": 12 - 8}
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0


def test_the_block_of_the_last_prompt_token_is_never_shared():
    s = scheduler()
    s.add(make_seq("a", SYSTEM[:8]))
    step(s)
    again = make_seq("b", SYSTEM[:8])  # exactly two full blocks: the second holds its last token
    s.add(again)
    assert step(s)["b"] == 4
    assert again.num_cached_tokens == 4


def test_a_finished_requests_prefix_outlives_it():
    s = scheduler()
    s.add(make_seq("a", SYSTEM + [1], max_tokens=1))
    step(s)
    assert not s.has_work() and s.allocator.num_free == s.allocator.num_total
    later = make_seq("b", SYSTEM + [7, 8, 9])
    s.add(later)
    assert step(s) == {"b": 13 - 8}


def test_decoded_tokens_fill_cacheable_blocks_too():
    s = scheduler()
    first = make_seq("a", [1, 2, 3], max_tokens=6)
    s.add(first)
    while s.has_work():
        step(s)
    # 3 prompt tokens and 6 outputs, 8 of them computed: two full blocks, which a next turn finds.
    turn = make_seq("b", first.token_ids + [42, 43])  # 11 tokens
    s.add(turn)
    assert step(s) == {"b": 11 - 8}


def test_an_admission_that_fails_gives_the_shared_blocks_back():
    s = scheduler(num_blocks=5)
    s.add(make_seq("a", SYSTEM[:8] + [1], max_tokens=1))
    step(s)  # 3 blocks, two of them registered; all free again
    hog = make_seq("hog", list(range(200, 211)), max_tokens=50)  # takes the 3 never-registered blocks
    s.add(hog)
    step(s)
    assert s.allocator.num_free == 2 and len(s.allocator.lookup(chain_hashes(SYSTEM, 4, [], 2))) == 2
    big = make_seq("big", SYSTEM[:8] + list(range(300, 310)))  # would share those 2, needs 3 more
    s.add(big)
    assert "big" not in step(s)
    assert big.block_ids == [] and big.num_computed_tokens == 0
    assert s.allocator.num_free == 2
    s.abort("hog")
    assert s.allocator.num_free == s.allocator.num_total


def test_a_preempted_sequence_finds_its_own_blocks_again():
    s = scheduler(num_blocks=10)
    old, new = make_seq("old", list(range(12)), max_tokens=12), make_seq("new", list(range(500, 515)), max_tokens=12)
    s.add(old)
    step(s)
    s.add(new)
    for _ in range(100):
        step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions == 1
    assert new.block_ids == [] and new.num_computed_tokens == 0  # the newest gave way
    recompute = new.num_tokens
    for _ in range(100):
        got = step(s)
        if "new" in got:
            break
    assert 0 < got["new"] < recompute - 8  # at least two of its blocks were still cached
    while s.has_work():
        step(s)
    assert s.allocator.num_free == s.allocator.num_total


def test_off_means_off():
    s = scheduler(caching=False)
    s.add(make_seq("a", SYSTEM + [1]))
    s.add(make_seq("b", SYSTEM + [2]))
    assert step(s) == {"a": 11, "b": 11}
    assert s.allocator.num_cached == 0


# ---- routing ------------------------------------------------------------------------------------

def test_the_index_forgets_a_prompts_tail_before_its_head():
    index = PrefixIndex()
    a = chain_hashes(list(range(16)), 4, [], 4)
    b = chain_hashes(list(range(100, 108)), 4, [], 2)
    index.record(0, a, capacity=5)
    assert index.cached_blocks(a) == {0: 4} and index.cached_blocks(b) == {}
    index.record(0, b, capacity=5)  # one over: a's last block goes
    assert index.cached_blocks(a) == {0: 3} and index.cached_blocks(b) == {0: 2}
    index.record(1, a[:2], capacity=5)
    assert index.cached_blocks(a) == {0: 3, 1: 2}
    index.forget(0)
    assert index.cached_blocks(a) == {1: 2}


def prefill_worker(i: int, pending: int) -> WorkerView:
    return WorkerView(i, Role.PREFILL, True, False, 0, 0, 0, 100, 100, pending)


def test_a_prompt_goes_where_its_prefix_is_unless_the_queue_there_costs_more():
    idle = [prefill_worker(0, 0), prefill_worker(1, 0)]
    assert pick_prefill_worker(idle) == 0
    assert pick_prefill_worker(idle, {1: 64}) == 1
    busy = [prefill_worker(0, 0), prefill_worker(1, 500)]
    assert pick_prefill_worker(busy, {1: 256}) == 0  # 244 tokens more to wait for than to compute
    assert pick_prefill_worker(busy, {1: 600}) == 1
    placed = place_prompt(busy + [WorkerView(2, Role.DECODE, True, False, 0, 0, 0, 100, 100, 0)], 700,
                          cached_tokens={1: 600})
    assert (placed.worker, placed.hand_off) == (1, True)


# ---- engine --------------------------------------------------------------------------------------

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def shared_prompts(prompts) -> list[list[int]]:
    """A 37-token system prompt before six questions, two of them asked twice, and one prompt that
    is the system prompt alone."""
    system = prompts[-1][:37]
    questions = [p[:n] for p, n in zip(prompts, (3, 7, 12, 20, 33, 48))]
    return [system + q for q in questions] + [system + questions[1], system + questions[4], system]


def _generate(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


@pytest.mark.parametrize("block_size", [1, 16])
def test_shared_prefixes_give_transformers_tokens(llama_dir, shared_prompts, block_size):
    expected, expected_lp = transformers_greedy(llama_dir, shared_prompts, NEW_TOKENS)
    llm = LLM(model=str(llama_dir), device="cpu", block_size=block_size)
    for round_ in range(2):  # the second round finds every prompt's blocks cached by the first
        outputs = _generate(llm, shared_prompts)
        for out, want, want_lp in zip(outputs, expected, expected_lp):
            got = out.outputs[0]
            assert got.token_ids == want
            assert [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)] == pytest.approx(want_lp, abs=1e-4)
        cached = [o.num_cached_tokens for o in outputs]
        assert all(c > 0 for c in cached[1:])  # the first prompt of round one had nothing to find
        if round_:
            assert cached == [(len(p) - 1) // block_size * block_size for p in shared_prompts]
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total


def test_eviction_and_preemption_with_a_small_pool(llama_dir, shared_prompts):
    expected, _ = transformers_greedy(llama_dir, shared_prompts, NEW_TOKENS)
    llm = LLM(model=str(llama_dir), device="cpu", block_size=4, num_kv_blocks=40)
    for _ in range(2):
        outputs = _generate(llm, shared_prompts)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total


def test_caching_off_computes_every_token(llama_dir, shared_prompts):
    llm = LLM(model=str(llama_dir), device="cpu", enable_prefix_caching=False)
    outputs = _generate(llm, shared_prompts)
    assert [o.num_cached_tokens for o in outputs] == [0] * len(shared_prompts)
    assert llm.engine.allocator.num_cached == 0
