"""The DOPD policy's emergency path on hand-made snapshots (pure: no server, no clock)."""

import dataclasses
from pathlib import Path

import dopd
from dopd.config import PolicyConfig
from dopd.messages import Role
from dopd.metrics import SLO
from dopd.policy.base import Snapshot
from dopd.policy.dopd import DopdPolicy
from dopd.policy.routing import WorkerView
from dopd.sim.costmodel import get_profile

COST = get_profile("llama3-70b-fp8", "h200")
SLO_ = SLO(1.5, 0.05)
BLOCKS = 10_000
PROFILES = Path(dopd.__file__).parent / "profiles"


def worker(wid: int, role: Role, running: int = 0, used: int = 0) -> WorkerView:
    return WorkerView(id=wid, role=role, alive=True, moving=False, num_running=running, num_waiting=0,
                      num_parked=0, kv_blocks_free=BLOCKS - used, kv_blocks_total=BLOCKS, pending_prefill_tokens=0)


def snapshot(workers: list[WorkerView], queued_tokens: int, moving: bool = False) -> Snapshot:
    return Snapshot(now=100.0, workers=workers, interval=None, queued_prefill_tokens=queued_tokens,
                    queued_prefill_requests=queued_tokens // 1000, handoff_queue=0, moving=moving)


def policy() -> DopdPolicy:
    return DopdPolicy(PolicyConfig(), COST, SLO_, num_workers=8)


def one_p_one_d() -> list[WorkerView]:
    return [worker(0, Role.PREFILL), worker(1, Role.DECODE, running=4, used=100)] + \
        [worker(i, Role.IDLE) for i in range(2, 8)]


def budget_tokens(pol: DopdPolicy) -> int:
    """Queued prompt tokens that fill one prefill worker's emergency budget exactly."""
    return int(pol.cfg.emergency_queue * SLO_.ttft / COST.prefill_b)


def test_a_burst_wakes_as_many_parked_workers_as_it_needs_at_once():
    pol = policy()
    decisions = pol.decide(snapshot(one_p_one_d(), queued_tokens=int(3.5 * budget_tokens(pol))))
    # 3.5 budgets' worth of queued prompts: 4 prefill workers hold it, so 3 parked ones wake up
    assert sorted(d.worker_id for d in decisions) == [2, 3, 4]
    assert all(d.role == Role.PREFILL and d.reason.startswith("emergency") for d in decisions)


def test_no_more_workers_than_are_parked():
    pol = policy()
    decisions = pol.decide(snapshot(one_p_one_d(), queued_tokens=40 * budget_tokens(pol)))
    assert len(decisions) == 6 and {d.role for d in decisions} == {Role.PREFILL}


def test_without_parked_workers_one_moves_from_a_role_that_can_spare_it():
    pol = policy()
    workers = [worker(0, Role.PREFILL)] + [worker(i, Role.DECODE, running=2, used=50) for i in range(1, 8)]
    decisions = pol.decide(snapshot(workers, queued_tokens=5 * budget_tokens(pol)))
    assert len(decisions) == 1 and decisions[0].role == Role.PREFILL


def test_under_the_budget_nothing_moves_and_nothing_while_a_move_is_under_way():
    pol = policy()
    assert pol.decide(snapshot(one_p_one_d(), queued_tokens=budget_tokens(pol) // 2)) == []
    assert policy().decide(snapshot(one_p_one_d(), queued_tokens=5 * budget_tokens(pol), moving=True)) == []


def test_an_ultra_short_prompt_is_prefilled_on_a_decode_worker_only_where_the_step_hides_it():
    from functools import partial

    from dopd.policy.routing import place_prompt

    workers = [worker(0, Role.PREFILL), worker(1, Role.DECODE, running=8, used=500)]
    h200 = policy()
    admits = partial(h200.admits, block_size=16)
    assert place_prompt(workers, 128, ultra_short_len=511, admits=admits).worker == 1  # no transfer
    long_step = place_prompt(workers, 511, ultra_short_len=511, admits=admits)  # its step would take > TPOT
    assert long_step.worker == 0 and long_step.hand_off
    cpu = DopdPolicy(PolicyConfig(), get_profile(str(PROFILES / "cpu-smollm2-135m-instruct.json")), SLO(2.5, 0.15), 3)
    assert place_prompt(workers, 64, ultra_short_len=511, admits=partial(cpu.admits, block_size=16)).worker == 0


def test_an_idle_decode_worker_does_not_take_a_prefill_its_step_cannot_hide():
    """The live CPU run's prefill-heavy phase: an idle decode worker prefilled 400-token prompts
    (~0.9 s a step) and the requests handed to it meanwhile waited ~1 s for their second token."""
    from functools import partial

    from dopd.policy.routing import place_prompt

    cpu = DopdPolicy(PolicyConfig(), get_profile(str(PROFILES / "cpu-smollm2-135m-instruct.json")), SLO(2.5, 0.15), 3)
    admits = partial(cpu.admits, block_size=16)
    idle = [worker(0, Role.PREFILL), worker(1, Role.DECODE)]
    placed = place_prompt(idle, 400, ultra_short_len=512, admits=admits)
    assert placed.worker == 0 and placed.hand_off
    assert place_prompt(idle, 16, ultra_short_len=512, admits=admits).worker == 1  # its step hides it
    # What the decode worker was already given to prefill counts: two 16-token prompts are one step.
    busy = [worker(0, Role.PREFILL), dataclasses.replace(worker(1, Role.DECODE), pending_prefill_tokens=400)]
    assert place_prompt(busy, 16, ultra_short_len=512, admits=admits).worker == 0


def test_a_load_hovering_at_a_boundary_does_not_flip_a_worker_every_interval():
    """The live CPU run's flapping: 5-s intervals of 5 or 7 arrivals put the decode need at ~1 worker."""
    from dataclasses import replace

    from dopd.policy.resources import IntervalStats

    cpu = get_profile(str(PROFILES / "cpu-smollm2-135m-instruct.json"))
    pol = DopdPolicy(PolicyConfig(interval=5.0), cpu, SLO(2.5, 0.15), num_workers=3)
    workers = [worker(0, Role.PREFILL), worker(1, Role.DECODE, running=3, used=30), worker(2, Role.DECODE)]
    moves, last_moved = [], {}
    for i in range(30):
        now = 5.0 * (i + 1)
        arrivals = 5 if i % 2 else 7
        stats = IntervalStats(start=now - 5, end=now, num_arrivals=arrivals, arrival_rate=arrivals / 5,
                              mean_input_len=64, var_input_len=100, mean_output_len=96, num_finished=arrivals,
                              num_failed=0, ttft_p50=None, ttft_p90=None, tpot_p50=None, tpot_p90=None,
                              attainment=1.0, queued_prefill_requests=0, handoff_queue=0)
        snap = Snapshot(now=now, workers=workers, interval=stats, queued_prefill_tokens=0, queued_prefill_requests=0,
                        handoff_queue=0, moving=False, last_moved=dict(last_moved))
        for d in pol.decide(snap):
            workers = [replace(w, role=d.role) if w.id == d.worker_id else w for w in workers]
            moves.append((i, d.worker_id, d.role))
            last_moved[d.worker_id] = now
    assert len(moves) <= 2, moves


def test_a_request_that_waited_past_the_ttft_slo_is_placed_on_kv_room_alone():
    from dopd.policy.routing import admission, pick_decode_worker

    full = [worker(1, Role.DECODE, running=250, used=9500)]  # its next step would be well past the TPOT SLO
    pol = policy()
    assert pick_decode_worker(full, 10, admits=admission(pol, 16, waited=0.5, patience=SLO_.ttft)) is None
    assert admission(pol, 16, waited=2.0, patience=SLO_.ttft) is None
    assert pick_decode_worker(full, 10, admits=admission(pol, 16, waited=2.0, patience=SLO_.ttft)) == 1
    assert admission(object(), 16) is None  # a policy without an admission check


def test_decode_correction_follows_decode_step_times_not_tpot_inflated_by_handoff_waits():
    """Requests that wait for decode room after their first token show a long TPOT, but the decode
    workers' steps take what the profile says: the correction must stay at 1. Corrected from TPOT,
    it climbed, admission held more requests back, and their TPOT grew further."""
    from dopd.policy.resources import IntervalStats

    pol = policy()
    step = COST.decode_time(32, 32 * 2000)
    for k in range(10):
        stats = IntervalStats(start=10.0 * k, end=10.0 * (k + 1), num_arrivals=50, arrival_rate=5.0,
                              mean_input_len=1000.0, var_input_len=0.0, mean_output_len=200.0, num_finished=50,
                              num_failed=0, ttft_p50=0.3, ttft_p90=0.5, tpot_p50=4 * step, tpot_p90=6 * step,
                              attainment=0.5, queued_prefill_requests=0, handoff_queue=20,
                              decode_steps=((32, 32 * 2000, step, 200),))
        snap = Snapshot(now=10.0 * (k + 1), workers=one_p_one_d(), interval=stats, queued_prefill_tokens=0,
                        queued_prefill_requests=0, handoff_queue=20, moving=False)
        pol.decide(snap)
    assert abs(pol.decode_correction.value - 1.0) < 1e-9
    slow = dataclasses.replace(stats, start=100.0, end=110.0, decode_steps=((32, 32 * 2000, 2 * step, 200),))
    pol.decide(Snapshot(now=110.0, workers=one_p_one_d(), interval=slow, queued_prefill_tokens=0,
                        queued_prefill_requests=0, handoff_queue=20, moving=False))
    assert pol.decode_correction.value > 1.2  # steps really twice as slow: it moves
