"""The KV handoff between two real worker processes: the bytes D pulls are P's, bit for bit."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch

from dopd.messages import AddRequest, AdoptRequest, FromWorker, ReleaseRequest, Role, Shutdown, StepResult
from dopd.sampling_params import SamplingParams
from dopd.workers.handle import WorkerHandle
from dopd.workers.loader import load_arch
from dopd.workers.runner import RunnerSpec
from dopd.workers.worker import WorkerSpec

BLOCK = 4
decoder = msgspec.msgpack.Decoder(FromWorker)


def results(handle: WorkerHandle, until, timeout: float = 30.0) -> StepResult:
    """Read a worker's step results until one satisfies `until`."""
    while handle.conn.poll(timeout):
        msg = decoder.decode(handle.conn.recv_bytes())
        if isinstance(msg, StepResult) and until(msg):
            return msg
    raise TimeoutError("no such result from the worker")


@pytest.fixture(scope="module")
def pair(llama_dir):
    spec = RunnerSpec(str(llama_dir), "cpu", "float32", "torch", 512, BLOCK, 64, None, 1, load_arch(llama_dir))
    handles = [WorkerHandle(WorkerSpec(i, spec, None, 8, 512, frozenset()), role)
               for i, role in enumerate((Role.PREFILL, Role.DECODE))]
    for h in handles:
        h.spawn()
    for h in handles:
        asyncio.run(h.wait_ready(120))
    handles[0].share_pool_with(handles[1])
    handles[1].share_pool_with(handles[0])
    yield handles
    for h in handles:
        h.send(Shutdown())
        h.join(10)


def test_decode_worker_pulls_the_prefill_workers_kv_bit_for_bit(pair, prompts):
    p, d = pair
    prompt = prompts[8]  # 117 tokens: 30 blocks, the last one partly filled
    params = SamplingParams(max_tokens=8, temperature=0)
    p.send(AddRequest("r1", prompt, params, 8, hand_off=True))
    parked = results(p, lambda r: r.parked).parked[0]
    assert parked.token_ids[:-1] == prompt and len(parked.block_ids) == -(-len(prompt) // BLOCK)
    source = p.pool[parked.block_ids].clone()

    d.send(AdoptRequest("r1", parked.token_ids, len(prompt), params, 8, 0, parked.block_ids))
    adopted = results(d, lambda r: r.adopted).adopted[0]
    assert adopted.ok and len(adopted.block_ids) == len(parked.block_ids)
    pulled = d.pool[adopted.block_ids]
    # [blocks, layers, k|v, slot, heads, dim] -> one row per token, for the prompt's tokens
    def per_token(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 3, 1, 2, 4, 5).flatten(0, 1)[: len(prompt)]
    assert torch.equal(per_token(pulled), per_token(source))
    assert source.abs().sum() > 0  # real values, not an empty pool

    p.send(ReleaseRequest("r1"))
    stats = results(p, lambda r: r.stats.num_parked == 0).stats
    assert stats.kv_blocks_free == stats.kv_blocks_total
    finished = results(d, lambda r: any(o.finish_reason for o in r.outputs))
    assert finished.stats.kv_blocks_free == finished.stats.kv_blocks_total


def test_pull_with_the_wrong_block_count_fails_cleanly(pair, prompts):
    p, d = pair
    params = SamplingParams(max_tokens=4, temperature=0)
    d.send(AdoptRequest("r2", prompts[3] + [1], len(prompts[3]), params, 4, 0, [0]))
    result = results(d, lambda r: r.adopted)
    assert not result.adopted[0].ok and "blocks" in result.adopted[0].error
    assert result.stats.kv_blocks_free == result.stats.kv_blocks_total  # nothing was allocated for it
