"""What every role policy sees and says, and the registry of policies.

A policy is a pure function of a snapshot: `decide(snapshot) -> list[Decision]`, no I/O and no
clock reads (the time is in the snapshot). Policies keep state between calls (forecast series,
hysteresis), so a run is a deterministic function of its snapshots — which is what lets the
server and the simulator drive the very same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dopd.config import PolicyConfig
from dopd.messages import Role
from dopd.policy.resources import IntervalStats
from dopd.policy.routing import WorkerView


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cluster as a policy may know it, at time `now`."""

    now: float
    workers: list[WorkerView]
    interval: IntervalStats | None  # set when a monitoring interval has just closed
    queued_prefill_tokens: int  # prompt tokens waiting anywhere for a prefill
    queued_prefill_requests: int
    handoff_queue: int  # prefilled requests waiting for decode capacity
    moving: bool  # a role move is still under way
    last_moved: dict[int, float] = field(default_factory=dict)  # worker id -> when its last move finished
    block_size: int = 16  # tokens per KV block

    def count(self, role: Role) -> int:
        return sum(1 for w in self.workers if w.alive and w.role == role)


@dataclass(frozen=True, slots=True)
class Decision:
    worker_id: int
    role: Role
    reason: str


def queued_prefill_tokens(pending: list[int], step_budget: int, held: int = 0) -> int:
    """Prompt tokens that wait for a prefill step: what each prefill worker has beyond the step it is
    running (its token budget), plus prompts not sent to any worker yet (`held`)."""
    return held + sum(max(0, p - step_budget) for p in pending)


def plan_moves(snapshot: Snapshot, num_prefill: int, num_decode: int, reason: str) -> list[Decision]:
    """Moves that turn the current roles into `num_prefill` P and `num_decode` D (the rest idle),
    touching as few workers as possible and, among those, the least loaded ones."""
    live = [w for w in snapshot.workers if w.alive and not w.moving]
    by_role = {r: [w for w in live if w.role == r] for r in Role}
    want = {Role.PREFILL: num_prefill, Role.DECODE: num_decode}
    want[Role.IDLE] = max(0, len(live) - num_prefill - num_decode - len(by_role[Role.MIXED]))
    surplus: list[WorkerView] = []
    for role in (Role.PREFILL, Role.DECODE, Role.IDLE):
        extra = len(by_role[role]) - want[role]
        if extra > 0:  # the least loaded give way: fewer requests to finish or migrate
            surplus += sorted(by_role[role], key=_load)[:extra]
    decisions = []
    # Idle workers are the first to be put to work, then the least loaded of a shrinking role.
    surplus.sort(key=lambda w: (w.role != Role.IDLE, _load(w)))
    for role in (Role.PREFILL, Role.DECODE, Role.IDLE):
        missing = want[role] - len(by_role[role])
        for _ in range(max(0, missing)):
            donor = next((w for w in surplus if w.role != role), None)
            if donor is None:
                break
            surplus.remove(donor)
            decisions.append(Decision(donor.id, role, reason))
    return decisions


def _load(w: WorkerView) -> tuple[int, int]:
    return (w.num_running + w.num_waiting + w.num_parked, w.pending_prefill_tokens)


def should_migrate(remaining_tokens: list[int], step_time: float, transfer_time: float,
                   room_blocks: int | None = None, need_blocks: int = 0) -> bool:
    """Migrate a decode worker's requests rather than let them finish, when finishing would hold
    the worker more than a few times longer than moving their KV (both in seconds) — and the other
    decode workers have the blocks to take them (`room_blocks` free for `need_blocks`): a migration
    with nowhere to go would park them instead of letting them run."""
    if not remaining_tokens or (room_blocks is not None and room_blocks < 1.2 * need_blocks):
        return False
    drain_time = max(remaining_tokens) * step_time
    return drain_time > 4 * (transfer_time + step_time)


POLICIES = ("colocated", "static", "dopd", "load_threshold", "sla")


class FixedPolicy:
    """colocated and static: the split they start with is the split they keep."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, snapshot: Snapshot) -> list[Decision]:
        return []

    def describe(self) -> dict:
        return {"name": self.name}


def make_policy(name: str, cost, slo, num_workers: int, cfg: PolicyConfig | None = None):
    """The policy called `name`; an unknown name's error lists the valid ones."""
    cfg = cfg or PolicyConfig()
    if name in ("colocated", "static"):
        return FixedPolicy(name)
    if name == "dopd":
        from dopd.policy.dopd import DopdPolicy

        return DopdPolicy(cfg, cost, slo, num_workers)
    if name == "load_threshold":
        from dopd.policy.load_threshold import LoadThresholdPolicy

        return LoadThresholdPolicy(cfg, num_workers)
    if name == "sla":
        from dopd.policy.sla import SlaPolicy

        return SlaPolicy(cfg, cost, slo, num_workers)
    raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
