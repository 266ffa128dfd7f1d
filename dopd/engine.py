"""One worker's engine: the scheduler and a runner, driven by typed messages, one step at a time.

The offline `LLM` runs it in-process; a server worker runs it inside its own process. A runner is
anything with `execute(batch) -> list[SampledToken | None]`, `pull_blocks(src_worker, src_ids,
dst_ids)`, `block_size` and `num_blocks`: the real model runner, or the mock runner that sleeps
for the cost model's predicted step time.
"""

from __future__ import annotations

import time

from dopd.kv.blocks import BlockAllocator, blocks_needed
from dopd.messages import (
    AbortRequest, AddRequest, Adopted, AdoptRequest, ExportRequest, Parked, ReleaseRequest, ResumeRequest, StepResult,
    TokenOutput, WorkerStats,
)
from dopd.scheduler import Scheduler
from dopd.sequence import Sequence, SeqStatus


class EngineCore:
    def __init__(self, runner, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: frozenset[int] = frozenset(), prefix_caching: bool = True) -> None:
        self.runner = runner
        self.allocator = BlockAllocator(runner.num_blocks)
        self.scheduler = Scheduler(self.allocator, runner.block_size, max_num_seqs, max_num_batched_tokens,
                                   prefix_caching=prefix_caching)
        self.eos_token_ids = eos_token_ids
        self._parked: list[Parked] = []
        self._adopted: list[Adopted] = []
        self._aborted: list[str] = []
        self._last_step = (0.0, 0, 0)
        # The last step could schedule nothing (every waiting sequence needs blocks that are not
        # free) and changed nothing: only a message (a release, an abort) can unblock it.
        self.stalled = False

    # ---- messages --------------------------------------------------------------------------------

    def add(self, msg: AddRequest) -> None:
        seq = Sequence(msg.request_id, list(msg.token_ids), len(msg.token_ids), msg.params, msg.max_tokens,
                       self.eos_token_ids, hand_off=msg.hand_off)
        self.scheduler.add(seq)

    def adopt(self, msg: AdoptRequest) -> None:
        """Pull a request's KV from another worker's pool into fresh blocks and start decoding it."""
        seq = Sequence(msg.request_id, list(msg.token_ids), msg.num_prompt_tokens, msg.params, msg.max_tokens,
                       self.eos_token_ids)
        num_cached = len(msg.token_ids) - 1
        need = blocks_needed(num_cached, self.runner.block_size)
        if need != len(msg.src_block_ids):
            self._adopted.append(Adopted(msg.request_id, False, f"{len(msg.src_block_ids)} blocks for {need}"))
            return
        # Room for the decode step that follows, too, so an adopted request is not preempted at once.
        if not self.allocator.can_allocate(blocks_needed(num_cached + 1, self.runner.block_size)):
            self._adopted.append(Adopted(msg.request_id, False, "no free KV blocks"))
            return
        block_ids = self.allocator.allocate(need)
        try:
            self.runner.pull_blocks(msg.src_worker, msg.src_block_ids, block_ids)
        except Exception as exc:  # the source is gone or its pool unreadable: fail this request only
            self.allocator.free(block_ids)
            self._adopted.append(Adopted(msg.request_id, False, f"KV pull failed: {exc}"))
            return
        seq.num_computed_tokens = num_cached
        self.scheduler.add_running(seq, block_ids)
        self._adopted.append(Adopted(msg.request_id, True, block_ids=block_ids))

    def release(self, msg: ReleaseRequest) -> None:
        self.scheduler.release(msg.request_id)

    def abort(self, msg: AbortRequest) -> None:
        if self.scheduler.abort(msg.request_id) is not None:
            self._aborted.append(msg.request_id)

    def export(self, msg: ExportRequest) -> None:
        """Park a decoding request so that another worker can adopt it (migration)."""
        for seq in self.scheduler.running:
            if seq.request_id == msg.request_id and seq.num_pending_tokens == 1:
                self.scheduler.park(seq)
                self._parked.append(Parked(seq.request_id, list(seq.block_ids), list(seq.token_ids)))
                return
        # Not decoding (finished meanwhile, or mid-prefill): the controller learns from the outputs.

    # ---- stepping --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> StepResult:
        outputs: list[TokenOutput] = []
        batch = self.scheduler.schedule()
        self.stalled = not batch.seqs and not batch.num_preempted
        started = time.perf_counter()
        num_prefill = 0
        if batch.seqs:
            sampled = self.runner.execute(batch)
            for seq, num_new, token in zip(batch.seqs, batch.num_new_tokens, sampled):
                seq.num_computed_tokens += num_new
                if num_new > 1 or seq.num_output_tokens == 0:
                    num_prefill += num_new
                if token is None:
                    continue
                finish = seq.append_token(token.token_id)
                cached = seq.num_cached_tokens if seq.num_output_tokens == 1 else None
                outputs.append(TokenOutput(seq.request_id, token.token_id, finish, token.logprob, token.rank,
                                           token.top_ids, token.top_logprobs, cached))
                if finish:
                    self.scheduler.finish(seq)
                elif seq.hand_off and seq.status == SeqStatus.RUNNING:
                    self.scheduler.park(seq)
                    self._parked.append(Parked(seq.request_id, list(seq.block_ids), list(seq.token_ids)))
            self._last_step = (time.perf_counter() - started, batch.num_tokens, num_prefill)
        result = StepResult(outputs, self._parked, self._adopted, self._aborted, self.stats())
        self._parked, self._adopted, self._aborted = [], [], []
        return result

    def take_events(self) -> StepResult | None:
        """What handling messages produced (adoptions, parkings, aborts), to send before the next step."""
        if not (self._parked or self._adopted or self._aborted):
            return None
        result = StepResult([], self._parked, self._adopted, self._aborted, self.stats())
        self._parked, self._adopted, self._aborted = [], [], []
        return result

    def stats(self) -> WorkerStats:
        s = self.scheduler
        step_time, step_tokens, num_prefill = self._last_step
        return WorkerStats(len(s.running), len(s.waiting), len(s.parked), self.allocator.num_free,
                           self.allocator.num_total, s.num_preemptions, step_time, step_tokens, num_prefill,
                           self.allocator.num_cached)

    def handle(self, msg) -> None:
        """Dispatch one controller message."""
        if isinstance(msg, AddRequest):
            self.add(msg)
        elif isinstance(msg, AdoptRequest):
            self.adopt(msg)
        elif isinstance(msg, ReleaseRequest):
            self.release(msg)
        elif isinstance(msg, AbortRequest):
            self.abort(msg)
        elif isinstance(msg, ExportRequest):
            self.export(msg)
        elif isinstance(msg, ResumeRequest):
            self.scheduler.resume(msg.request_id)
        else:
            raise TypeError(f"engine cannot handle {type(msg).__name__}")
