"""Where each request goes: pure functions of the workers' views (no I/O, no clock).

- a new prompt → a prefill worker (least pending prefill work), or in colocated mode → the least
  loaded mixed worker, or — ultra-short prompts while the prefill queue is long — straight to a
  decode worker, which prefills it itself and skips the KV transfer;
- a prefilled request → the decode worker with the most headroom (KV usage and queue, as Dynamo's
  KV router scores them), provided its free blocks cover the request with a watermark to spare.
"""

from __future__ import annotations

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

    @property
    def accepts_prefill(self) -> bool:
        return self.alive and self.role in (Role.PREFILL, Role.MIXED)

    @property
    def accepts_decode(self) -> bool:
        return self.alive and self.role in (Role.DECODE, Role.MIXED)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 1.0


def pick_prefill_worker(workers: list[WorkerView]) -> int | None:
    """The prefill-capable worker with the least prompt work queued on it."""
    candidates = [w for w in workers if w.accepts_prefill]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.pending_prefill_tokens, w.num_waiting + w.num_running, w.id)).id


def pick_decode_worker(workers: list[WorkerView], blocks_needed: int, watermark: float = 0.02) -> int | None:
    """The decode-capable worker with the most headroom that has room for `blocks_needed` blocks.

    The watermark keeps a little of every pool free for the running sequences' next blocks, so a
    decode worker is not filled to the point of preempting its own requests.
    """
    candidates = [
        w for w in workers
        if w.accepts_decode and w.kv_blocks_free - blocks_needed >= watermark * w.kv_blocks_total
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
