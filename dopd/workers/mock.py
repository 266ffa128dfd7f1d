"""The mock engine's runner: no model, no KV tensors; a step takes the cost model's predicted time.

A mock worker runs the real worker loop, the real scheduler and block allocator, and real IPC; only
the forward pass is replaced by a sleep for the step time that `dopd.sim.costmodel` predicts for
the batch, and a KV pull by a sleep for the link's transfer time. So a laptop serves over HTTP as
8 H100s serving a 70B model would, at their speed.

Tokens are synthetic: a fixed function of the request id and the position, never EOS, so outputs
do not depend on which worker produced them (migrations included).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from dopd.scheduler import ScheduledBatch
from dopd.sim.costmodel import CostModel, attn_work
from dopd.workers.sampler import SampledToken

# Synthetic tokens come from a band of ordinary vocabulary, clear of the special tokens at the start.
TOKEN_BAND_START = 300
TOKEN_BAND_SIZE = 2000
DEFAULT_PROFILE = "llama3-8b"


@dataclass(frozen=True, slots=True)
class MockSpec:
    cost: CostModel
    block_size: int
    num_blocks: int
    vocab_size: int


def synthetic_token(request_id: str, position: int, vocab_size: int) -> int:
    band = min(TOKEN_BAND_SIZE, max(1, vocab_size - TOKEN_BAND_START))
    start = min(TOKEN_BAND_START, vocab_size - band)
    return start + (zlib.crc32(request_id.encode()) + 7919 * position) % band


def batch_step_time(cost: CostModel, batch: ScheduledBatch) -> float:
    """The cost model's time for a scheduled batch: prefill chunks and decodes, mixed if both."""
    prefill_tokens = prefill_work = num_decodes = decode_context = 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        if num_new == 1 and seq.num_computed_tokens > 0:
            num_decodes += 1
            decode_context += seq.num_computed_tokens + 1
        else:
            prefill_tokens += num_new
            prefill_work += attn_work(num_new, seq.num_computed_tokens)
    return cost.step_time(prefill_tokens, prefill_work, num_decodes, decode_context)


class MockRunner:
    def __init__(self, spec: MockSpec) -> None:
        self.spec = spec
        self.cost = spec.cost
        self.block_size = spec.block_size
        self.num_blocks = spec.num_blocks
        self.device = "cpu"
        self.pool = None
        self.peer_pools: dict[int, object] = {}

    def execute(self, batch: ScheduledBatch) -> list[SampledToken | None]:
        started = time.perf_counter()
        results: list[SampledToken | None] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            done = seq.num_computed_tokens + num_new == seq.num_tokens
            token = synthetic_token(seq.request_id, seq.num_tokens, self.spec.vocab_size) if done else None
            results.append(SampledToken(token, logprob=0.0, rank=1) if done else None)
        _sleep_until(started + batch_step_time(self.cost, batch))
        return results

    def pull_blocks(self, src_worker: int, src_ids: list[int], dst_ids: list[int]) -> None:
        _sleep_until(time.perf_counter() + self.cost.kv_transfer_time(len(src_ids) * self.block_size))


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


def mock_spec(cfg, vocab_size: int) -> MockSpec:
    """The mock worker spec for a server configuration (see dopd.server)."""
    from dopd.sim.costmodel import get_link, get_profile

    cost = get_profile(cfg.cluster.model_profile or DEFAULT_PROFILE, cfg.cluster.hardware, cfg.cluster.tp)
    if cfg.cluster.link:
        import dataclasses

        cost = dataclasses.replace(cost, link=get_link(cfg.cluster.link, cfg.cluster.hardware))
    block_size = cfg.cache.block_size
    num_blocks = cfg.cache.num_kv_blocks or max(1, cost.kv_capacity_tokens // block_size)
    return MockSpec(cost, block_size, num_blocks, vocab_size)
