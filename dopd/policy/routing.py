"""Where each request goes: pure functions of the workers' views (no I/O, no clock).

- a new prompt → a prefill worker (least prefill work ahead of it there: the prompt tokens queued
  on it, less those of this prompt its prefix cache likely holds, as Dynamo's KV router scores
  them), or in colocated mode → the least loaded mixed worker, or — an ultra-short prompt, when
  the step that prefills it stays within the TPOT SLO — straight to a decode worker, which
  prefills it itself and skips the KV transfer;
- a prefilled request → the decode worker with the most headroom (KV usage and queue, as Dynamo's
  KV router scores them), provided its free blocks cover the request with a watermark to spare.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from dopd.messages import Role


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What routing and the policy may know about one worker."""

    id: int
    role: Role  # the role it serves now (its target role while a move is under way)
    alive: bool
    moving: bool  # a role move is under way
    num_running: int
    num_waiting: int
    num_parked: int
    kv_blocks_free: int  # net of blocks promised to adoptions in flight
    kv_blocks_total: int
    pending_prefill_tokens: int  # prompt tokens sent to it and not yet prefilled
    num_incoming: int = 0  # KV handoffs into it in flight

    @property
    def accepts_prefill(self) -> bool:
        return self.alive and self.role in (Role.PREFILL, Role.MIXED)

    @property
    def accepts_decode(self) -> bool:
        return self.alive and self.role in (Role.DECODE, Role.MIXED)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 1.0


def pick_prefill_worker(workers: list[WorkerView], cached_tokens: dict[int, int] | None = None) -> int | None:
    """The prefill-capable worker that would finish this prompt's prefill first: the least prompt
    work queued on it plus this prompt's tokens it does not hold (`cached_tokens`: worker -> tokens
    of this prompt its prefix cache likely holds)."""
    candidates = [w for w in workers if w.accepts_prefill]
    if not candidates:
        return None
    cached = cached_tokens or {}
    return min(candidates, key=lambda w: (w.pending_prefill_tokens - cached.get(w.id, 0),
                                          w.num_waiting + w.num_running, w.id)).id


Admission = Callable[..., bool]  # (decode worker, blocks of the request[, prefill_tokens=]) -> may it take it?


def admission(policy, block_size: int, waited: float = 0.0, patience: float = math.inf) -> Admission | None:
    """The policy's decode admission check (dopd's: the step stays within TPOT), if it has one.

    None — only KV room counts — for a prefilled request that has waited for decode room longer
    than `patience` (the TTFT SLO): its first two tokens are already seconds apart, and holding it
    for a TPOT prediction, which a wrong correction factor can make refuse all but one request per
    worker, would only run it into its timeout."""
    admits = getattr(policy, "admits", None)
    return None if admits is None or waited > patience else functools.partial(admits, block_size=block_size)


def pick_decode_worker(workers: list[WorkerView], blocks_needed: int, watermark: float = 0.02,
                       admits: Admission | None = None) -> int | None:
    """The decode-capable worker with the most headroom that has room for `blocks_needed` blocks.

    The watermark keeps a little of every pool free for the running sequences' next blocks, so a
    decode worker is not filled to the point of preempting its own requests. `admits` (the policy's
    check that the worker's next decode step stays within the TPOT SLO with the request added)
    keeps a worker from taking more than it can decode in time: a prefilled request then waits on
    its prefill worker, which costs it one longer gap between its first two tokens instead of
    slowing every token of every request on the decode worker.
    """
    candidates = [
        w for w in workers
        if w.accepts_decode and w.kv_blocks_free - blocks_needed >= watermark * w.kv_blocks_total
        and (admits is None or admits(w, blocks_needed))
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.kv_usage + w.num_waiting, w.num_running, w.id)).id


def pick_mixed_worker(workers: list[WorkerView]) -> int | None:
    """Colocated serving: the mixed worker with the fewest outstanding requests."""
    candidates = [w for w in workers if w.alive and w.role == Role.MIXED]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.num_running + w.num_waiting, w.pending_prefill_tokens, w.id)).id


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new prompt goes: `worker` prefills it, and decodes it too unless `hand_off`."""

    worker: int
    hand_off: bool


def place_prompt(workers: list[WorkerView], num_tokens: int, ultra_short_len: int = 0,
                 block_size: int = 16, admits: Admission | None = None,
                 cached_tokens: dict[int, int] | None = None) -> Placement | None:
    """A new prompt's placement, or None when no worker can take it now.

    Disaggregated: a prefill worker, except an ultra-short prompt (≤ `ultra_short_len` tokens),
    which the least-loaded decode worker prefills itself when it has nothing waiting and `admits`
    it with that prefill in its step — the KV transfer would cost about as much as the prefill.
    Without prefill workers: a mixed worker.
    """
    if not any(w.accepts_prefill and w.role == Role.PREFILL for w in workers):
        target = pick_mixed_worker(workers)
        return None if target is None else Placement(target, hand_off=False)
    if 0 < num_tokens <= ultra_short_len:
        local = [w for w in workers if w.accepts_decode and w.num_waiting == 0]
        admits_here = None if admits is None else lambda w, blocks: admits(w, blocks, prefill_tokens=num_tokens)
        target = pick_decode_worker(local, -(-num_tokens // block_size) + 1, admits=admits_here)
        if target is not None:
            return Placement(target, hand_off=False)
    target = pick_prefill_worker(workers, cached_tokens)
    if target is None:
        return None
    role = next(w.role for w in workers if w.id == target)
    return Placement(target, hand_off=role == Role.PREFILL)


def prefill_idle(workers: list[WorkerView]) -> bool:
    """Some prefill worker has nothing to prefill."""
    return any(w.accepts_prefill and w.role == Role.PREFILL and w.pending_prefill_tokens == 0 for w in workers)


class ShortPromptBatcher:
    """Length-aware prefill batching (DOPD §5): prompts at or above the forecast mean input length
    go at once; shorter ones wait until `max_tokens` of them are together or the oldest has waited
    `max_wait` seconds, so that they are prefilled in one batch on one worker. Pure: times are given."""

    def __init__(self, max_tokens: int, max_wait: float) -> None:
        self.max_tokens, self.max_wait = max_tokens, max_wait
        self.items: list = []
        self.num_tokens = 0
        self.oldest: float | None = None

    def add(self, item, num_tokens: int, now: float, prefill_idle: bool = False) -> list:
        """Queue a short prompt; returns the batch to send if this one completes it (else []).

        With a prefill worker idle, waiting gains nothing: the batch goes at once. The wait only
        ever overlaps the step the prefill workers are busy with anyway."""
        self.items.append(item)
        self.num_tokens += num_tokens
        if self.oldest is None:
            self.oldest = now
        return self.flush() if self.num_tokens >= self.max_tokens or prefill_idle else []

    def due(self, now: float) -> list:
        """The batch to send because its oldest prompt has waited long enough (else [])."""
        if self.oldest is not None and now - self.oldest >= self.max_wait:
            return self.flush()
        return []

    def flush(self) -> list:
        items, self.items, self.num_tokens, self.oldest = self.items, [], 0, None
        return items

    @property
    def deadline(self) -> float | None:
        return None if self.oldest is None else self.oldest + self.max_wait
