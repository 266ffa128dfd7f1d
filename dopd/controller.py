"""The controller: the event loop that owns the workers, places requests, runs KV handoffs and role
moves, and feeds every token back to its request.

Where a request's KV is, at every moment (`RequestState`):
- `worker`: the worker whose pool holds its sequence (running, waiting or parked there);
- `adopt_to`: a decode worker pulling that KV right now (a handoff or a migration in flight).
The source's blocks are released only when the puller answers `Adopted` (whatever the outcome) or
dies, so a block is never reused while a copy from it may still be running. The lease
(`handoff_timeout`) bounds how long the *client* waits: past it the request ends with an error
and the puller is told to drop it; the blocks come back as soon as the puller answers.

Routing decisions come from `dopd.policy.routing`, role decisions from the policy (`dopd.policy`);
this file only applies them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from dopd.kv.blocks import blocks_needed, chain_hashes, num_shareable_blocks
from dopd.messages import (
    AbortRequest, AddRequest, Adopted, AdoptRequest, ExportRequest, Parked, Ping, Pong, ReleaseRequest,
    ResumeRequest, Role, Shutdown, StepResult, WorkerError,
)
from dopd.metrics import RequestRecord
from dopd.moves import RoleMove
from dopd.policy import routing
from dopd.policy.base import Decision, Snapshot, queued_prefill_tokens, should_migrate
from dopd.policy.prefix_index import PrefixIndex
from dopd.policy.resources import ResourceMonitor
from dopd.request import Request, RequestStatus
from dopd.telemetry import Telemetry
from dopd.workers.handle import WorkerHandle, WorkerState

log = logging.getLogger("dopd.controller")

HOUSEKEEPING_INTERVAL = 0.05
PING_INTERVAL = 1.0
POLICY_TICK = 0.25  # how often the policy's emergency path looks
HANG_TIMEOUT = 60.0  # a worker silent this long (no step result, no pong) is killed and replaced
RESPAWN_TIMEOUT = 600.0
RESPAWN_MAX_DELAY = 5.0
MAX_REPLACEMENTS = 2  # a request whose worker dies before its first token is re-placed this many times
POOL_SPARE = 0.02  # the share of a decode pool that routing keeps free (pick_decode_worker's watermark)


class Overloaded(Exception):
    """Admission is full: the API answers 429."""


@dataclass(slots=True, eq=False)
class RequestState:
    request: Request
    deadline: float
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: int | None = None  # whose pool holds the sequence
    parked: Parked | None = None  # set while its KV waits in `worker`'s pool for a decode worker
    adopt_to: int | None = None
    adopt_blocks: int = 0  # blocks reserved on `adopt_to` for the pull in flight
    lease_deadline: float = 0.0
    parked_at: float = 0.0
    source_lost: bool = False  # the worker holding the KV died while a pull from it was in flight
    on_decode: bool = False  # `worker` decodes it (not a prefill-only placement)
    num_replaced: int = 0  # times re-placed after losing its worker before its first token
    block_hashes: list[bytes] | None = None  # its prompt's full blocks (prefix-aware routing)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Controller:
    def __init__(self, workers: list[WorkerHandle], tokenizer, max_model_len: int, telemetry: Telemetry,
                 request_timeout: float, handoff_timeout: float, max_num_requests: int, policy=None,
                 policy_interval: float = 10.0, ultra_short_len: int = 0,
                 batcher: routing.ShortPromptBatcher | None = None, transfer_time_per_token: float = 0.0,
                 step_token_budget: int = 8192, prefix_index: PrefixIndex | None = None) -> None:
        self.workers = {w.id: w for w in workers}
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.telemetry = telemetry
        self.request_timeout = request_timeout
        self.handoff_timeout = handoff_timeout
        self.max_num_requests = max_num_requests
        self.policy = policy
        self.policy_interval = policy_interval
        self.ultra_short_len = ultra_short_len
        self.batcher = batcher
        self.transfer_time_per_token = transfer_time_per_token
        self.step_token_budget = step_token_budget  # a worker's tokens per step: what one step takes off its queue
        self.prefix_index = prefix_index  # None: the workers cache no prefixes, routing ignores them
        self.resources = ResourceMonitor(telemetry.slo)  # on self.clock()
        self.last_moved: dict[int, float] = {}
        self.requests: dict[str, RequestState] = {}
        self.unplaced: deque[RequestState] = deque()  # no worker could take them yet
        self.handoffs: deque[RequestState] = deque()  # parked, waiting for decode capacity
        self.pending_prefill_tokens: dict[int, int] = {w.id: 0 for w in workers}
        self.moves: dict[int, RoleMove] = {}
        self.move_log: deque[dict] = deque(maxlen=200)
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.monotonic()
        self.closing = False

    # ---- life cycle -----------------------------------------------------------------------------

    async def start(self, startup_timeout: float = 600.0) -> None:
        for w in self.workers.values():
            w.spawn()
        await asyncio.gather(*(w.wait_ready(startup_timeout) for w in self.workers.values()))
        # A request must fit in one worker's pool, less the share routing keeps free: one that does
        # not would wait for blocks forever. Small pools (tests, --num-kv-blocks) lower the limit.
        fit = max(1, int(min(w.num_blocks for w in self.workers.values()) * (1 - POOL_SPARE))) * self._block_size()
        if fit < self.max_model_len:
            log.warning("max model length lowered from %d to %d tokens: the smallest KV pool holds no more",
                        self.max_model_len, fit)
            self.max_model_len = fit
        for w in self.workers.values():
            for peer in self.workers.values():
                if peer is not w:
                    w.share_pool_with(peer)
            w.last_heard = time.monotonic()
            w.attach(self._on_message, self._on_exit)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="dopd-housekeeping"))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, give in-flight ones `grace` seconds, then end them and every worker."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for st in list(self.requests.values()):
            self.abort(st.request_id, "server shutting down")
        for task in self._tasks:
            task.cancel()
        for w in self.workers.values():
            w.send(Shutdown())  # queued behind the aborts, on the pipe the event loop still flushes
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.join, 5.0) for w in self.workers.values()))
        for w in self.workers.values():
            w.detach()
            w.state = WorkerState.DEAD

    # ---- requests in ----------------------------------------------------------------------------

    def clock(self) -> float:
        """Seconds since the controller started: the time base of the snapshot and the role log."""
        return time.monotonic() - self.started_at

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def submit(self, request: Request) -> RequestState:
        if self.closing:
            raise Overloaded("server is shutting down")
        if len(self.requests) >= self.max_num_requests:
            raise Overloaded(f"{len(self.requests)} requests in flight (limit {self.max_num_requests})")
        st = RequestState(request, deadline=request.arrival_time + self.request_timeout)
        self.requests[request.request_id] = st
        n = request.num_prompt_tokens
        if self.policy is not None:  # without one nothing closes the monitor's intervals: it would only grow
            self.resources.on_arrival(n, request.max_tokens)
        long_len = getattr(self.policy, "long_prompt_len", lambda: None)()
        try:
            if self.batcher is not None and long_len and self.ultra_short_len < n < long_len:
                batch = self.batcher.add(st, n, time.monotonic(), routing.prefill_idle(self.views()))
                self._place_all(batch)  # short: batched with others
            else:
                self._place(st)
        except Exception:  # not accepted after all: leave nothing behind to count against the limit
            self._end(st, "abort", error="could not be placed")
            raise
        return st

    def abort(self, request_id: str, reason: str) -> None:
        """End a request wherever it is (client gone, timeout, error); its blocks come back."""
        st = self.requests.get(request_id)
        if st is None:
            return
        self._end(st, "abort", error=reason)

    # ---- placement ------------------------------------------------------------------------------

    def views(self) -> list[routing.WorkerView]:
        return [self._view(w) for w in self.workers.values()]

    def _view(self, w: WorkerHandle) -> routing.WorkerView:
        move = self.moves.get(w.id)
        s = w.stats
        return routing.WorkerView(
            id=w.id, role=move.target if move else w.role, alive=w.state != WorkerState.DEAD and
            w.state != WorkerState.STARTING, moving=move is not None, num_running=s.num_running,
            num_waiting=s.num_waiting, num_parked=s.num_parked, kv_blocks_free=w.kv_blocks_available,
            kv_blocks_total=s.kv_blocks_total, pending_prefill_tokens=self.pending_prefill_tokens[w.id],
            num_incoming=w.num_incoming,
        )

    def _place(self, st: RequestState, placement: routing.Placement | None = None) -> None:
        """Send a request that has no token yet to a worker that will prefill it."""
        req = st.request
        bs = self._block_size()
        if self.prefix_index is not None and st.block_hashes is None:
            shareable = num_shareable_blocks(req.num_prompt_tokens, bs)
            st.block_hashes = chain_hashes(req.prompt_token_ids, bs, [], shareable)
        if placement is None:
            cached = None if self.prefix_index is None else {
                w: n * bs for w, n in self.prefix_index.cached_blocks(st.block_hashes).items()}
            placement = routing.place_prompt(self.views(), req.num_prompt_tokens, self.ultra_short_len, bs,
                                             routing.admission(self.policy, bs), cached)
        if placement is None:
            self.unplaced.append(st)
            return
        w = self.workers[placement.worker]
        msg = AddRequest(req.request_id, req.prompt_token_ids, req.params, req.max_tokens, placement.hand_off)
        if not w.send(msg):
            self.unplaced.append(st)
            return
        st.worker, st.on_decode = w.id, not placement.hand_off
        if self.prefix_index is not None:
            self.prefix_index.record(w.id, st.block_hashes, w.num_blocks)
        req.status = RequestStatus.PREFILLING
        self.pending_prefill_tokens[w.id] += req.num_prompt_tokens

    def _place_all(self, batch: list[RequestState]) -> None:
        """A batch of short prompts, all to one prefill worker so that they share a step."""
        batch = [st for st in batch if not st.request.finished]
        if batch:
            placement = routing.place_prompt(self.views(), sum(st.request.num_prompt_tokens for st in batch))
            for st in batch:
                self._place(st, placement)

    def _retry_unplaced(self) -> None:
        for _ in range(len(self.unplaced)):
            st = self.unplaced.popleft()
            if not st.request.finished:
                self._place(st)
                if st.worker is None:
                    return  # still no room: keep the rest in order

    # ---- worker messages ------------------------------------------------------------------------

    def _on_message(self, w: WorkerHandle, msg) -> None:
        w.last_heard = time.monotonic()
        if isinstance(msg, StepResult):
            w.stats = stats = msg.stats
            if self.policy is not None and w.role == Role.DECODE and stats.step_tokens and not stats.num_prefill_tokens:
                used = (stats.kv_blocks_total - stats.kv_blocks_free) * self._block_size()
                self.resources.on_decode_step(stats.step_tokens, used, stats.step_time)
            # In the order they happened: adoptions were done before the step, parking at its end.
            for adopted in msg.adopted:
                self._on_adopted(w, adopted)
            for out in msg.outputs:
                self._on_token(w, out)
            for parked in msg.parked:
                self._on_parked(w, parked)
            self._drain_handoffs()
            self._progress_moves()
        elif isinstance(msg, Pong):
            w.stats = msg.stats
        elif isinstance(msg, WorkerError):
            log.error("worker %d failed: %s", w.id, msg.message)
            w.kill()

    def _on_token(self, w: WorkerHandle, out) -> None:
        st = self.requests.get(out.request_id)
        if st is None or st.request.finished or st.worker != w.id:
            return  # aborted meanwhile, or a stale output of a migrated sequence
        req = st.request
        if req.num_output_tokens == 0:
            self.pending_prefill_tokens[w.id] -= req.num_prompt_tokens
            if self.prefix_index is not None:  # prefix caching is on
                self.telemetry.observe_prefill(time.monotonic(), req.num_prompt_tokens, out.num_cached_tokens or 0)
            if st.on_decode:
                req.status = RequestStatus.DECODING
        if req.add_token(out):
            if out.finish_reason is None:  # ended by a stop string: the worker does not know yet
                w.send(AbortRequest(req.request_id))
                st.worker = None
            elif st.parked is None:
                st.worker = None  # the worker freed it when it finished
            self._finished(st)
        st.wakeup.set()

    def _on_parked(self, w: WorkerHandle, parked: Parked) -> None:
        st = self.requests.get(parked.request_id)
        if st is None or st.worker != w.id or st.request.finished:
            w.send(ReleaseRequest(parked.request_id))
            if st is not None and st.worker == w.id:
                st.worker = None
                self._forget(st)
            return
        st.parked, st.parked_at = parked, time.monotonic()
        st.request.status = RequestStatus.HANDOFF
        self.handoffs.append(st)

    def _drain_handoffs(self) -> None:
        """Hand parked requests to decode workers with room, oldest first."""
        while self.handoffs:
            st = self.handoffs[0]
            if st.request.finished or st.parked is None:
                self.handoffs.popleft()
                continue
            home = self.workers[st.worker]
            if self._view(home).accepts_decode:  # its worker decodes now (moving to decode): no copy needed
                self.handoffs.popleft()
                home.send(ResumeRequest(st.request_id))
                st.parked, st.on_decode = None, True
                st.request.status = RequestStatus.DECODING
                continue
            need = blocks_needed(len(st.parked.token_ids), self._block_size())
            admits = routing.admission(self.policy, self._block_size(), time.monotonic() - st.parked_at,
                                       self.telemetry.slo.ttft)
            target = routing.pick_decode_worker([v for v in self.views() if v.id != st.worker], need, admits=admits)
            if target is None:
                return  # decode is full: the KV waits on the prefill worker (backpressure)
            self.handoffs.popleft()
            d = self.workers[target]
            req, p = st.request, st.parked
            msg = AdoptRequest(req.request_id, p.token_ids, req.num_prompt_tokens, req.params, req.max_tokens,
                               st.worker, p.block_ids)
            if d.send(msg):
                d.reserved_blocks += need
                d.num_incoming += 1
                st.adopt_to, st.adopt_blocks = target, need
                st.lease_deadline = time.monotonic() + self.handoff_timeout
            else:
                self.handoffs.appendleft(st)
                return

    def _on_adopted(self, d: WorkerHandle, adopted: Adopted) -> None:
        st = self.requests.get(adopted.request_id)
        if st is None or st.adopt_to != d.id:
            return
        # Not from `st.parked`: it is gone if the source died while this pull was running.
        d.reserved_blocks -= st.adopt_blocks
        d.num_incoming -= 1
        st.adopt_to, st.adopt_blocks = None, 0
        if not adopted.ok and not st.request.finished and not st.source_lost and adopted.error == "no free KV blocks":
            self.handoffs.appendleft(st)  # the decode worker filled up meanwhile: try again
            return
        src = self.workers.get(st.worker)
        if src is not None and src.alive:
            src.send(ReleaseRequest(st.request_id))
        self.telemetry.handoff_seconds.observe(time.monotonic() - st.parked_at)
        st.parked, st.worker = None, None
        if st.request.finished or st.source_lost or not adopted.ok:
            if adopted.ok:
                d.send(AbortRequest(st.request_id))
            reason = adopted.error or "the worker holding the KV was lost"
            self._end(st, "abort", error=f"KV handoff failed: {reason}")
            return
        st.worker, st.on_decode = d.id, True
        st.request.status = RequestStatus.DECODING

    def _on_exit(self, w: WorkerHandle) -> None:
        if w.state == WorkerState.DEAD:
            return
        w.state = WorkerState.DEAD
        if not self.closing:
            log.error("worker %d (pid %s) exited with code %s", w.id, w.pid, w.process.exitcode)
        self.moves.pop(w.id, None)
        self.pending_prefill_tokens[w.id] = 0
        w.reserved_blocks = w.num_incoming = 0
        for st in list(self.requests.values()):
            if st.adopt_to == w.id:  # the puller died: the source may free its copy now
                st.adopt_to, st.adopt_blocks = None, 0
                self._end(st, "abort", error=f"decode worker {w.id} was lost during the KV handoff")
            elif st.worker == w.id:
                st.worker, st.parked = None, None
                if st.adopt_to is not None:
                    st.source_lost = True  # settled when the puller answers
                elif st.request.num_output_tokens == 0 and not st.request.finished \
                        and st.num_replaced < MAX_REPLACEMENTS:
                    st.num_replaced += 1
                    self._place(st)  # nothing was streamed yet: run it elsewhere
                elif st.request.num_output_tokens == 0 and not st.request.finished:
                    # Its workers keep dying under it: it may be what kills them. Not again.
                    self._end(st, "abort", error=f"worker {w.id} was lost ({st.num_replaced + 1} workers lost "
                                                 "under this request before its first token)")
                else:
                    self._end(st, "abort", error=f"worker {w.id} was lost")
        if self.prefix_index is not None:
            self.prefix_index.forget(w.id)
        if not self.closing:
            self._tasks.append(asyncio.create_task(self._respawn(w), name=f"dopd-respawn-{w.id}"))

    async def _respawn(self, w: WorkerHandle) -> None:
        """Start a fresh process in the lost worker's slot and role; it rejoins once its pool is shared."""
        w.restarts += 1
        await asyncio.sleep(min(RESPAWN_MAX_DELAY, 0.25 * 2 ** (w.restarts - 1)))  # back off a crash loop
        if self.closing:
            return
        try:
            w.spawn()
            await w.wait_ready(RESPAWN_TIMEOUT)
        except Exception as e:
            log.error("worker %d failed to restart: %s", w.id, e)
            w.kill()
            w.state = WorkerState.DEAD
            self._tasks.append(asyncio.create_task(self._respawn(w), name=f"dopd-respawn-{w.id}"))
            return
        for peer in self.workers.values():
            if peer is not w and peer.alive:
                peer.share_pool_with(w)
                w.share_pool_with(peer)
        w.last_heard = time.monotonic()
        w.attach(self._on_message, self._on_exit)
        log.info("worker %d rejoined as %s (pid %s, restart %d)", w.id, w.role.name.lower(), w.pid, w.restarts)
        self._retry_unplaced()

    # ---- endings --------------------------------------------------------------------------------

    def _end(self, st: RequestState, reason: str, error: str | None = None) -> None:
        if not st.request.finished:
            st.request.finish(reason, error=error)
            self._finished(st)
            st.wakeup.set()
        if st.adopt_to is not None:
            self.workers[st.adopt_to].send(AbortRequest(st.request_id))  # it answers Adopted; then we release
        elif st.worker is not None:
            w = self.workers[st.worker]
            if w.alive:
                w.send(AbortRequest(st.request_id))
            if st.request.num_output_tokens == 0:
                self.pending_prefill_tokens[w.id] = max(0, self.pending_prefill_tokens[w.id]
                                                        - st.request.num_prompt_tokens)
            st.worker, st.parked = None, None
        self._forget(st)

    def _finished(self, st: RequestState) -> None:
        req = st.request
        end = req.finished_time or time.monotonic()
        ok = req.error is None
        ttft = req.first_token_time - req.arrival_time if req.first_token_time else None
        e2el = (req.last_token_time or end) - req.arrival_time if ok else None
        record = RequestRecord(
            request_id=req.request_id, arrival_time=req.arrival_time - self.started_at,
            input_len=req.num_prompt_tokens, output_len=req.num_output_tokens, ttft=ttft if ok else None,
            itl=[], e2el=e2el, success=ok, error=req.error or "")
        self.telemetry.record(end, record)
        if self.policy is not None:
            self.resources.on_finish(record, req.max_tokens)
        self._forget(st)

    def _forget(self, st: RequestState) -> None:
        """Drop the state once the request is over and no worker holds or copies its KV."""
        if st.request.finished and st.worker is None and st.adopt_to is None:
            self.requests.pop(st.request_id, None)

    # ---- role moves -----------------------------------------------------------------------------

    def set_roles(self, roles: dict[int, Role], reason: str, migrate: bool | None = None) -> list[dict]:
        """Move workers to new roles in place: stop giving them work of the old role, finish or
        migrate that work, flip. `migrate` None: migrate running decodes unless they are nearly
        done (`should_migrate`). Raises ValueError if the result could not serve requests."""
        for wid in roles:
            if wid not in self.workers or not self.workers[wid].alive:
                raise ValueError(f"no live worker {wid}; workers: {sorted(self.workers)}")
        final = {wid: roles.get(wid, self.moves[wid].target if wid in self.moves else w.role)
                 for wid, w in self.workers.items() if w.alive}
        if not any(r in (Role.PREFILL, Role.MIXED) for r in final.values()):
            raise ValueError("at least one worker must be able to prefill (prefill or mixed)")
        if not any(r in (Role.DECODE, Role.MIXED) for r in final.values()):
            raise ValueError("at least one worker must be able to decode (decode or mixed)")
        started = []
        for wid, role in roles.items():
            w = self.workers[wid]
            current = self.moves[wid].target if wid in self.moves else w.role
            if role == current:
                continue
            move = RoleMove(w.id, w.role, role, reason, self.clock())
            move.migrate = self._should_migrate(w) if migrate is None else migrate
            self.moves[wid] = move
            w.state = WorkerState.DRAINING
            started.append(move.describe())
            log.info("worker %d: %s -> %s (%s)", wid, w.role.name.lower(), role.name.lower(), reason)
        self._progress_moves()
        self._retry_unplaced()
        return started

    def _should_migrate(self, w: WorkerHandle) -> bool:
        decoding = [st for st in self.requests.values() if st.worker == w.id and st.on_decode]
        remaining = [st.request.max_tokens - st.request.num_output_tokens for st in decoding]
        lengths = [st.request.num_prompt_tokens + st.request.num_output_tokens for st in decoding]
        room = sum(v.kv_blocks_free for v in self.views() if v.id != w.id and v.accepts_decode)
        need = sum(blocks_needed(n, self._block_size()) for n in lengths)
        return should_migrate(remaining, w.stats.step_time, sum(lengths) * self.transfer_time_per_token, room, need)

    def _progress_moves(self) -> None:
        for wid, move in list(self.moves.items()):
            w = self.workers[wid]
            mine = [st for st in self.requests.values() if st.worker == wid or st.adopt_to == wid]
            if move.needs_migration:
                for st in mine:
                    if st.on_decode and st.worker == wid and st.parked is None and st not in move.exported \
                            and st.request.num_output_tokens > 0 and st.adopt_to is None:
                        w.send(ExportRequest(st.request_id))
                        st.on_decode = False  # its tokens now come after an adoption elsewhere
                        move.exported.add(st)
                        w.state = WorkerState.MIGRATING
            old_work = [st for st in mine
                        if move.blocks_flip(st.on_decode or st.adopt_to == wid, st in move.exported)]
            if not old_work:
                del self.moves[wid]
                w.role, w.state = move.target, WorkerState.SERVING
                record = move.finish(self.clock())
                self.last_moved[wid] = record["finished_at"]
                self.move_log.append(record)
                self.telemetry.role_changes.labels(move.source.name.lower(), move.target.name.lower()).inc()
                log.info("worker %d now %s after %.1f ms (%d requests moved)", wid, move.target.name.lower(),
                         record["duration_ms"], record["num_migrated"])

    # ---- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        last_ping = last_policy = 0.0
        next_interval = time.monotonic() + self.policy_interval
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                now = time.monotonic()
                for st in list(self.requests.values()):
                    if st.request.finished:
                        continue
                    if st.adopt_to is not None and now > st.lease_deadline:
                        self._end(st, "abort", error=f"KV handoff timed out after {self.handoff_timeout:.0f} s")
                    elif now > st.deadline:
                        self._end(st, "abort", error=f"request timed out after {self.request_timeout:.0f} s")
                if self.batcher is not None:
                    self._place_all(self.batcher.due(now))
                self._retry_unplaced()
                self._drain_handoffs()
                self._progress_moves()
                if now - last_ping >= PING_INTERVAL:
                    last_ping = now
                    for w in self.workers.values():
                        if w.state == WorkerState.DEAD or w.state == WorkerState.STARTING:
                            continue
                        if now - w.last_heard > HANG_TIMEOUT:
                            log.error("worker %d has not answered for %.0f s: replacing it", w.id, now - w.last_heard)
                            w.kill()
                        else:
                            w.send(Ping(now))
                if self.policy is not None and now - last_policy >= POLICY_TICK:
                    last_policy = now
                    closing = now >= next_interval
                    if closing:
                        # A fixed cadence, as the simulator's: an interval closed late (on a tick, on a
                        # busy event loop) must not make the next one start late too.
                        next_interval += self.policy_interval
                        if next_interval <= now:
                            next_interval = now + self.policy_interval
                    self._apply(self.policy.decide(self.policy_snapshot(self.clock(), closing)))
            except Exception:  # one bad tick must not stop the housekeeping for good
                log.exception("housekeeping failed")

    def policy_snapshot(self, now: float, close_interval: bool) -> Snapshot:
        views = self.views()
        interval = None
        if close_interval:
            live = [w for w in self.workers.values() if w.alive]
            kv = {w.id: 1 - w.stats.kv_blocks_free / w.stats.kv_blocks_total for w in live if w.stats.kv_blocks_total}
            interval = self.resources.close(now, kv, self._queued_prefill()[1], len(self.handoffs))
        tokens, requests = self._queued_prefill()
        return Snapshot(now=now, workers=views, interval=interval, queued_prefill_tokens=tokens,
                        queued_prefill_requests=requests, handoff_queue=len(self.handoffs), moving=bool(self.moves),
                        last_moved=dict(self.last_moved), block_size=self._block_size())

    def _queued_prefill(self) -> tuple[int, int]:
        """Prompt tokens and requests that wait for a prefill: sent and not yet done, or held here."""
        held = list(self.unplaced) + (self.batcher.items if self.batcher is not None else [])
        tokens = queued_prefill_tokens(list(self.pending_prefill_tokens.values()), self.step_token_budget,
                                       sum(st.request.num_prompt_tokens for st in held))
        waiting = sum(w.stats.num_waiting for w in self.workers.values() if w.alive and w.role != Role.DECODE)
        return tokens, waiting + len(held)

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            try:
                self.set_roles({d.worker_id: d.role}, d.reason)
            except ValueError as e:  # a stale decision (a worker died meanwhile): skip it, say why
                log.warning("policy decision %s skipped: %s", d, e)

    def _block_size(self) -> int:
        return next(iter(self.workers.values())).block_size
