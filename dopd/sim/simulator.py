"""A virtual-clock discrete-event simulation of N workers, built from the server's own parts.

What is the same code as the live server: the per-worker `Scheduler` and `BlockAllocator`, the
step time of a scheduled batch (`dopd.workers.mock.batch_step_time` over the cost model), the
routing (`dopd.policy.routing`), the length-aware batcher, the resource monitor, the role policies
(`dopd.policy`), the role-move rule (`dopd.moves.RoleMove`) and the migrate-or-drain choice. What is
simulated: time (a heap of events instead of processes and sleeps) and the controller's plumbing
(placing a request, handing its KV to a decode worker, applying a decision), which here is a direct
call where the server sends a message. A KV handoff takes the cost model's link time, during which
the destination's blocks are held, as in the server.

A simulated prompt is a length, not tokens; prefix caching (the scheduler's, and the controller's
prefix-aware routing) runs where the workload says which prompts share what: Mooncake traces'
`hash_ids`, turned into the block keys of the prompts `scripts/bench.py` would send
(`dopd.workload.prefix_block_keys`). Other workloads share nothing, as their prompts on the wire.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from dopd.config import PolicyConfig
from dopd.kv.blocks import BlockAllocator, blocks_needed, num_shareable_blocks
from dopd.messages import Role
from dopd.metrics import SLO, RequestRecord, summarize
from dopd.moves import RoleMove
from dopd.policy import routing
from dopd.policy.base import Snapshot, make_policy, queued_prefill_tokens, should_migrate
from dopd.policy.prefix_index import PrefixIndex
from dopd.policy.resources import ResourceMonitor
from dopd.sampling_params import SamplingParams
from dopd.scheduler import ScheduledBatch, Scheduler
from dopd.sequence import Sequence
from dopd.sim.costmodel import CostModel
from dopd.workers.mock import batch_step_time
from dopd.workload import WorkloadRequest, prefix_block_keys

POLICY_TICK = 0.25  # as the server's housekeeping
MAX_RUN_STEPS = 16  # decode steps one event may stand for (see `_kick`)
PARAMS = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True, slots=True)
class SimConfig:
    cost: CostModel
    num_workers: int
    policy: str = "dopd"
    pd_ratio: tuple[int, int] | None = None  # start split (default: half and half); colocated: all mixed
    slo: SLO = SLO(1.5, 0.05)
    policy_cfg: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int = 16
    max_num_seqs: int = 128  # the server's defaults
    max_num_batched_tokens: int = 8192
    max_time: float = math.inf
    prefix_caching: bool = True  # as the server's default; in effect for workloads with Mooncake hash_ids


@dataclass(slots=True, eq=False)
class SimRequest:
    index: int
    arrival: float
    input_len: int
    output_len: int
    hash_ids: list[int] | None = None
    seq: Sequence | None = None  # made at arrival, dropped when done: only live requests hold one
    worker: int | None = None
    on_decode: bool = False
    first_token: float | None = None
    finished: float | None = None
    parked_at: float = 0.0


@dataclass(slots=True, eq=False)
class SimWorker:
    id: int
    role: Role
    scheduler: Scheduler
    busy: bool = False
    batch: ScheduledBatch | None = None
    step_time: float = 0.0  # of the first step of the current run
    run_steps: int = 1  # decode steps the current event stands for
    run_start: float = 0.0
    run_growth: float = 0.0  # how much longer each further step of the run takes (its context grows)
    run_version: int = 0  # a truncated run's first event is stale
    pending_prefill_tokens: int = 0
    incoming: int = 0  # adoptions in flight to it


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: dict
    timeline: list[dict]  # the split over time, beside the load
    role_changes: list[dict]
    gpu_seconds: float


class Simulator:
    def __init__(self, cfg: SimConfig, requests: list[WorkloadRequest]) -> None:
        self.cfg = cfg
        self.cost = cfg.cost
        self.now = 0.0
        self.events: list = []
        self._order = itertools.count()
        self.requests = [SimRequest(i, r.arrival_time, r.input_len, r.output_len, r.hash_ids)
                         for i, r in enumerate(sorted(requests, key=lambda r: r.arrival_time))]
        caching = cfg.prefix_caching and any(r.hash_ids for r in self.requests)
        self.prefix_index = PrefixIndex() if caching else None
        self.live: dict[str, SimRequest] = {}  # request id -> request, for the live ones
        num_blocks = max(1, cfg.cost.kv_capacity_tokens // cfg.block_size)
        self.workers = [SimWorker(i, role, Scheduler(BlockAllocator(num_blocks), cfg.block_size, cfg.max_num_seqs,
                                                     cfg.max_num_batched_tokens, prefix_caching=caching))
                        for i, role in enumerate(self._initial_roles())]
        self.policy = make_policy(cfg.policy, cfg.cost, cfg.slo, cfg.num_workers, cfg.policy_cfg)
        self.monitor = ResourceMonitor(cfg.slo)
        dopd = cfg.policy == "dopd"
        self.ultra_short_len = cfg.policy_cfg.ultra_short_len if dopd else 0
        wait = cfg.policy_cfg.short_batch_wait * cfg.slo.ttft
        self.batcher = routing.ShortPromptBatcher(cfg.max_num_batched_tokens, wait) if dopd and wait > 0 else None
        self.handoffs: list[SimRequest] = []
        self.unplaced: list[SimRequest] = []
        self.moves: dict[int, RoleMove] = {}
        self.exported: dict[int, set] = {}
        self.last_moved: dict[int, float] = {}
        self.role_changes: list[dict] = []
        self.timeline: list[dict] = []
        self.records: list[RequestRecord] = []
        self.gpu_seconds = 0.0

    def _initial_roles(self) -> list[Role]:
        n = self.cfg.num_workers
        if self.cfg.policy == "colocated" or n == 1:
            return [Role.MIXED] * n
        p, d = self.cfg.pd_ratio or (max(1, n // 2), n - max(1, n // 2))
        if p + d > n or (self.cfg.policy == "static" and p + d != n):
            raise ValueError(f"pd ratio {p}:{d} does not fit {n} workers")
        return [Role.PREFILL] * p + [Role.DECODE] * d + [Role.IDLE] * (n - p - d)

    # ---- the event loop -----------------------------------------------------------------------

    def _at(self, time: float, kind: str, payload=None) -> None:
        heapq.heappush(self.events, (time, next(self._order), kind, payload))

    def run(self) -> SimResult:
        for r in self.requests:
            self._at(r.arrival, "arrival", r)
        self._at(0.0, "tick")
        interval_end = self.cfg.policy_cfg.interval
        remaining = len(self.requests)
        last_busy_time = 0.0
        while self.events and remaining:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if self.now > self.cfg.max_time:
                break
            if kind == "step":
                worker, version = payload
                if version == self.workers[worker].run_version:
                    remaining -= self._step_done(self.workers[worker])
            elif kind == "arrival":
                self._arrive(payload)
            elif kind == "adopted":
                self._adopted(*payload)
            elif kind == "tick":
                self._drain_handoffs()
                if self.batcher is not None:
                    self._place_all(self.batcher.due(self.now))
                closing = self.now >= interval_end
                if closing:
                    interval_end = self.now + self.cfg.policy_cfg.interval
                busy = sum(1 for w in self.workers if w.role != Role.IDLE)
                self.gpu_seconds += busy * self.cost.num_gpus * (self.now - last_busy_time)
                last_busy_time = self.now
                self._apply(self.policy.decide(self._snapshot(closing)), closing)
                self._at(self.now + POLICY_TICK, "tick")
        return self._result()

    # ---- requests -----------------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        # The token list only needs its length (the scheduler asks nothing else): a bytearray keeps
        # a long prompt to a byte a token, with C-speed len() and append().
        r.seq = Sequence(str(r.index), bytearray(r.input_len), r.input_len, PARAMS, max(1, r.output_len))
        if self.prefix_index is not None:  # the keys the scheduler would hash the prompt's tokens into
            r.seq.block_hashes = prefix_block_keys(r.hash_ids, r.input_len, r.index, self.cfg.block_size)
        self.live[r.seq.request_id] = r
        self.monitor.on_arrival(r.input_len, r.output_len)
        long_len = getattr(self.policy, "long_prompt_len", lambda: None)()
        if self.batcher is not None and long_len and self.ultra_short_len < r.input_len < long_len:
            self._place_all(self.batcher.add(r, r.input_len, self.now, routing.prefill_idle(self._views())))
        else:
            self._place(r)

    def _place(self, r: SimRequest, placement: routing.Placement | None = None) -> None:
        bs = self.cfg.block_size
        shareable = r.seq.block_hashes[:num_shareable_blocks(r.input_len, bs)]  # as the controller hashes a prompt
        if placement is None:
            cached = None if self.prefix_index is None else {
                w: n * bs for w, n in self.prefix_index.cached_blocks(shareable).items()}
            placement = routing.place_prompt(self._views(), r.input_len, self.ultra_short_len, bs,
                                             routing.admission(self.policy, bs), cached)
        if placement is None:
            self.unplaced.append(r)
            return
        w = self.workers[placement.worker]
        self._interrupt(w)
        r.seq.hand_off = placement.hand_off
        r.worker, r.on_decode = w.id, not placement.hand_off
        if self.prefix_index is not None:
            self.prefix_index.record(w.id, shareable, w.scheduler.allocator.num_total)
        w.pending_prefill_tokens += r.input_len
        w.scheduler.add(r.seq)
        self._kick(w)

    def _place_all(self, batch: list[SimRequest]) -> None:
        if batch:
            placement = routing.place_prompt(self._views(), sum(r.input_len for r in batch))
            for r in batch:
                self._place(r, placement)

    def _kick(self, w: SimWorker) -> None:
        """Start the worker's next step if it is idle and has work (the worker loop).

        A batch of decodes only, with nothing waiting, repeats itself unchanged until one of its
        requests finishes, something arrives for the worker, or a block runs out. One event then
        stands for up to MAX_RUN_STEPS such steps (their times summed, each step's context one token
        longer), ending at the first finish; anything that touches the worker meanwhile cuts the run
        at the step in progress (`_interrupt`). The steps and their times are those the scheduler
        would produce one by one; this only saves the per-step Python.
        """
        if w.busy or not w.scheduler.has_work():
            return
        batch = w.scheduler.schedule()
        if not batch.seqs:
            return
        w.busy, w.batch = True, batch
        w.step_time = batch_step_time(self.cost, batch)
        steps = 1
        if not w.scheduler.waiting and w.id not in self.moves and all(n == 1 for n in batch.num_new_tokens):
            steps = min(MAX_RUN_STEPS, min(seq.max_tokens - seq.num_output_tokens for seq in batch.seqs))
            bs = self.cfg.block_size
            extra = sum(blocks_needed(seq.num_computed_tokens + steps, bs) - len(seq.block_ids) for seq in batch.seqs)
            if extra > w.scheduler.allocator.num_free:
                steps = 1
        num = len(batch.seqs)
        w.run_growth = self.cost.decode_b * num if steps > 1 else 0.0
        w.run_steps, w.run_start = steps, self.now
        w.run_version += 1
        self._at(self.now + self._run_time(w, steps), "step", (w.id, w.run_version))

    def _run_time(self, w: SimWorker, steps: int) -> float:
        return steps * w.step_time + w.run_growth * steps * (steps - 1) / 2

    def _interrupt(self, w: SimWorker) -> None:
        """Something is about to touch `w`: end its decode run at the step now in progress."""
        if not w.busy or w.run_steps == 1:
            return
        elapsed = self.now - w.run_start
        done = 1
        while done < w.run_steps and self._run_time(w, done) <= elapsed:
            done += 1
        w.run_steps = done
        w.run_version += 1
        self._at(w.run_start + self._run_time(w, done), "step", (w.id, w.run_version))

    def _step_done(self, w: SimWorker) -> int:
        """Apply a finished step (or decode run) as `EngineCore.step` does; returns requests finished."""
        batch, w.busy, w.batch = w.batch, False, None
        if w.role == Role.DECODE and all(n == 1 for n in batch.num_new_tokens):
            context = sum(seq.num_computed_tokens + 1 for seq in batch.seqs)
            self.monitor.on_decode_step(len(batch.seqs), context, self._run_time(w, w.run_steps) / w.run_steps,
                                        w.run_steps)
        finished = 0
        live = self.live
        if w.run_steps > 1:  # the run's earlier steps: one token each, blocks as the scheduler grows them
            extra = w.run_steps - 1
            for seq in batch.seqs:
                seq.num_computed_tokens += extra
                seq.token_ids.extend(bytes(extra))
                w.scheduler._grow(seq, 1)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens != len(seq.token_ids):
                continue
            r = live[seq.request_id]
            seq.token_ids.append(0)
            if r.first_token is None:
                r.first_token = self.now
                w.pending_prefill_tokens -= r.input_len
            if len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_tokens:
                w.scheduler.finish(seq)
                finished += self._finish(r)
            elif seq.hand_off:
                w.scheduler.park(seq)
                r.parked_at = self.now
                self.handoffs.append(r)
        if self.handoffs:
            self._drain_handoffs()
        self._progress_move(w)
        self._kick(w)
        return finished

    def _finish(self, r: SimRequest) -> int:
        r.finished, r.worker = self.now, None
        del self.live[r.seq.request_id]
        r.seq = None
        record = RequestRecord(request_id=str(r.index), arrival_time=r.arrival, input_len=r.input_len,
                               output_len=r.output_len, ttft=r.first_token - r.arrival, itl=[],
                               e2el=self.now - r.arrival, success=True)
        self.records.append(record)
        self.monitor.on_finish(record, r.output_len)
        return 1

    # ---- KV handoff ---------------------------------------------------------------------------

    def _drain_handoffs(self) -> None:
        while self.handoffs:
            r = self.handoffs[0]
            home = self.workers[r.worker]
            if self._views()[home.id].accepts_decode:  # its worker decodes now: decode it there, no copy
                self.handoffs.pop(0)
                home.scheduler.resume(r.seq.request_id)
                r.on_decode = True
                self._progress_move(home)
                self._kick(home)
                continue
            need = blocks_needed(len(r.seq.token_ids), self.cfg.block_size)
            admits = routing.admission(self.policy, self.cfg.block_size, self.now - r.parked_at, self.cfg.slo.ttft)
            target = routing.pick_decode_worker([v for v in self._views() if v.id != r.worker], need, admits=admits)
            if target is None:
                return
            self.handoffs.pop(0)
            d = self.workers[target]
            self._interrupt(d)
            blocks = d.scheduler.allocator.allocate(blocks_needed(len(r.seq.token_ids) - 1, self.cfg.block_size))
            d.incoming += 1
            self._at(self.now + self.cost.kv_transfer_time(len(r.seq.token_ids)), "adopted", (r, d.id, blocks))

    def _adopted(self, r: SimRequest, target: int, blocks: list[int]) -> None:
        src, d = self.workers[r.worker], self.workers[target]
        d.incoming -= 1
        src.scheduler.release(r.seq.request_id)
        seq = Sequence(r.seq.request_id, r.seq.token_ids, r.input_len, PARAMS, r.seq.max_tokens)
        seq.num_computed_tokens = len(seq.token_ids) - 1
        seq.block_hashes = r.seq.block_hashes  # the decode worker registers the adopted blocks under them
        r.seq, r.worker, r.on_decode = seq, d.id, True
        d.scheduler.add_running(seq, blocks)
        self._progress_move(src)
        self._kick(d)

    # ---- policy and role moves ----------------------------------------------------------------

    def _views(self) -> list[routing.WorkerView]:
        views = []
        for w in self.workers:
            s, move = w.scheduler, self.moves.get(w.id)
            views.append(routing.WorkerView(
                w.id, move.target if move else w.role, True, move is not None, len(s.running), len(s.waiting),
                len(s.parked), s.allocator.num_free, s.allocator.num_total, w.pending_prefill_tokens, w.incoming))
        return views

    def _snapshot(self, closing: bool) -> Snapshot:
        held = self.unplaced + (self.batcher.items if self.batcher else [])
        queued = queued_prefill_tokens([w.pending_prefill_tokens for w in self.workers],
                                       self.cfg.max_num_batched_tokens, sum(r.input_len for r in held))
        waiting = sum(len(w.scheduler.waiting) for w in self.workers if w.role != Role.DECODE) + len(held)
        interval = None
        if closing:
            kv = {w.id: w.scheduler.allocator.usage for w in self.workers}
            interval = self.monitor.close(self.now, kv, waiting, len(self.handoffs))
            self.timeline.append({"time": self.now, "rate": interval.arrival_rate,
                                  **{r.name.lower(): sum(w.role == r for w in self.workers) for r in Role}})
        return Snapshot(self.now, self._views(), interval, queued, waiting, len(self.handoffs), bool(self.moves),
                        dict(self.last_moved), self.cfg.block_size)

    def _apply(self, decisions, closing: bool) -> None:
        for d in decisions:
            w = self.workers[d.worker_id]
            if w.id in self.moves or d.role == w.role:
                continue
            move = RoleMove(w.id, w.role, d.role, d.reason, self.now)
            decoding = [r for r in self._on(w) if r.on_decode]
            self._interrupt(w)
            lengths = [len(r.seq.token_ids) for r in decoding]
            room = sum(v.kv_blocks_free for v in self._views() if v.id != w.id and v.accepts_decode)
            need = sum(blocks_needed(n, self.cfg.block_size) for n in lengths)
            move.migrate = should_migrate([r.seq.max_tokens - (len(r.seq.token_ids) - r.input_len) for r in decoding],
                                          w.step_time, self.cost.kv_transfer_time(sum(lengths)), room, need)
            self.moves[w.id] = move
            self._progress_move(w)
        if self.unplaced:
            pending, self.unplaced = self.unplaced, []
            for r in pending:
                self._place(r)

    def _on(self, w: SimWorker) -> list[SimRequest]:
        seqs = w.scheduler.running + list(w.scheduler.waiting) + list(w.scheduler.parked.values())
        return [self.live[s.request_id] for s in seqs]

    def _progress_move(self, w: SimWorker) -> None:
        move = self.moves.get(w.id)
        if move is None:
            return
        mine = self._on(w)
        if move.needs_migration and not w.busy:  # between steps, as the worker handles an export
            for r in mine:
                if r.on_decode and r.first_token is not None and r.seq in w.scheduler.running \
                        and r.seq.num_pending_tokens == 1 and r not in move.exported:
                    w.scheduler.park(r.seq)
                    r.on_decode = False
                    r.parked_at = self.now
                    move.exported.add(r)
                    self.handoffs.append(r)
            self._drain_handoffs()
        if w.incoming or any(move.blocks_flip(r.on_decode, r in move.exported) for r in mine):
            return
        del self.moves[w.id]
        w.role = move.target
        self.last_moved[w.id] = self.now
        self.role_changes.append(move.finish(self.now))
        self._kick(w)

    def _result(self) -> SimResult:
        duration = max((r.finished for r in self.requests if r.finished is not None), default=0.0)
        for r in self.requests:
            if r.finished is None:  # still running at max_time: counted as failed
                self.records.append(RequestRecord(request_id=str(r.index), arrival_time=r.arrival,
                                                  input_len=r.input_len, output_len=0, ttft=None, itl=[], e2el=None,
                                                  success=False, error="unfinished when the simulation ended"))
        records = sorted(self.records, key=lambda rec: int(rec.request_id))
        summary = summarize(records, duration, self.cfg.slo, self.cfg.num_workers * self.cost.num_gpus)
        summary["gpu_seconds"] = self.gpu_seconds
        return SimResult(records, summary, self.timeline, self.role_changes, self.gpu_seconds)


def sim_config(cfg) -> SimConfig:
    """What the server would run with the mock engine under the same flags (a `DopdConfig`)."""
    from dopd.sim.costmodel import get_link, get_profile
    from dopd.workers.mock import DEFAULT_PROFILE

    cluster = cfg.cluster
    cost = get_profile(cluster.model_profile or DEFAULT_PROFILE, cluster.hardware, cluster.tp)
    if cluster.link:
        import dataclasses

        cost = dataclasses.replace(cost, link=get_link(cluster.link, cluster.hardware))
    if cluster.gpus % cost.num_gpus:
        raise ValueError(f"--gpus {cluster.gpus} is not a multiple of the profile's {cost.num_gpus} GPUs per worker")
    num_workers = cluster.gpus // cost.num_gpus
    split = None if cluster.mode == "colocated" or num_workers == 1 else cluster.split(num_workers)
    slo = SLO(cfg.server.slo_ttft or 1.5, cfg.server.slo_tpot or 0.05)
    return SimConfig(cost=cost, num_workers=num_workers, policy=cluster.mode, pd_ratio=split, slo=slo,
                     policy_cfg=cfg.policy, block_size=cfg.cache.block_size,
                     max_num_seqs=cfg.scheduler.max_num_seqs,
                     max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens or 8192,
                     prefix_caching=cfg.cache.enable_prefix_caching)


def simulate(requests: list[WorkloadRequest], cost: CostModel, num_workers: int, policy: str = "dopd",
             **kwargs) -> SimResult:
    """Simulate `requests` on `num_workers` workers under `policy` (see SimConfig for the rest)."""
    return Simulator(SimConfig(cost=cost, num_workers=num_workers, policy=policy, **kwargs), requests).run()
