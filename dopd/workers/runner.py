"""Model runner: a scheduled batch → packed inputs → one forward pass → sampled tokens.

Owns the weights, the KV pool and the attention backend of one worker (or of the offline `LLM`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dopd.kv.pool import KVPool, KVPoolShape
from dopd.scheduler import ScheduledBatch
from dopd.workers import loader
from dopd.workers.attention import AttentionBatch, make_attention
from dopd.workers.model import ModelArch
from dopd.workers.sampler import SampledToken, sample

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 0.5
CUDA_MEMORY_FRACTION = 0.9


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """Everything a worker process needs to build its runner (picklable, sent once at spawn)."""

    model_dir: str
    device: str
    dtype: str
    attention: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int | None
    kv_cache_gb: float | None
    num_threads: int | None = None
    arch: ModelArch | None = None  # read from the checkpoint's config here: workers skip importing transformers
    workers_on_device: int = 1  # workers sharing this GPU: each sizes its KV pool for its share of the memory


class ModelRunner:
    def __init__(self, spec: RunnerSpec) -> None:
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if spec.num_threads and self.device.type == "cpu":
            torch.set_num_threads(spec.num_threads)
        model_dir = Path(spec.model_dir)
        self.arch: ModelArch = spec.arch or loader.load_arch(model_dir)
        self.dtype = loader.resolve_dtype(spec.dtype, self.device)
        self.max_model_len = spec.max_model_len
        self.model = loader.load_model(model_dir, self.arch, self.dtype, self.device, spec.max_model_len)
        # On CPU, KV and attention stay float32 even under bf16 weights: bf16 attention over long
        # context is slow and noisy there.
        self.kv_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        num_blocks = spec.num_kv_blocks or self._blocks_for_memory(spec)
        shape = KVPoolShape(num_blocks, self.arch.num_layers, spec.block_size, self.arch.num_kv_heads,
                            self.arch.head_dim)
        self.pool = KVPool.allocate(shape, self.kv_dtype, self.device)
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        self.peer_pools: dict[int, KVPool] = {}  # other workers' pools, mapped once at start-up
        self.attn = make_attention(spec.attention, self.pool, self.arch.num_heads, self.arch.num_kv_heads,
                                   self.arch.head_dim)

    def _blocks_for_memory(self, spec: RunnerSpec) -> int:
        shape = KVPoolShape(1, self.arch.num_layers, spec.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        per_block = shape.bytes_per_block(self.kv_dtype)
        if spec.kv_cache_gb is not None:
            budget = spec.kv_cache_gb * 2**30
        elif self.device.type == "cuda":
            # Workers on one GPU start together and may all see it empty: each takes its share of what it
            # sees free, so that together they never ask for more than the fraction.
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * CUDA_MEMORY_FRACTION / spec.workers_on_device - 256 * 2**20  # activations, workspaces
        else:
            budget = CPU_KV_CACHE_GB * 2**30
        return max(1, int(budget // per_block))

    def pull_blocks(self, src_worker: int, src_ids: list[int], dst_ids: list[int]) -> None:
        self.pool.copy_blocks_from(self.peer_pools[src_worker].tensor, src_ids, dst_ids)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken | None]:
        """Run one step; one entry per scheduled sequence, None where a prefill chunk samples nothing."""
        n = len(batch.seqs)
        # Decodes first: attention backends batch them separately from the prefills.
        order = sorted(range(n), key=lambda i: batch.num_new_tokens[i] != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens, kv_lens, tables = [], [], []
        sample_rows: list[int] = []  # row in the packed batch whose logits are sampled
        sampled_seq: list[int] = []  # ... and which scheduled sequence it belongs to
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            span = range(start, end)
            positions.extend(span)
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            q_lens.append(num_new)
            kv_lens.append(end)
            tables.append(table)
            if end == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampled_seq.append(i)
        num_decodes = sum(1 for q in q_lens if q == 1)
        to = dict(device=self.device, dtype=torch.long)
        self.attn.prepare(AttentionBatch(q_lens, kv_lens, tables, torch.tensor(slots, **to), num_decodes))
        hidden = self.model(torch.tensor(input_ids, **to), torch.tensor(positions, **to), self.attn)
        results: list[SampledToken | None] = [None] * n
        if sample_rows:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, **to)])
            seqs = [batch.seqs[i] for i in sampled_seq]
            tokens = sample(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs])
            for i, token in zip(sampled_seq, tokens):
                results[i] = token
        return results
