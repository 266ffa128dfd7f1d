"""The cluster as `GET /v1/cluster` shows it (and the monitor draws it): a JSON-able dict."""

from __future__ import annotations

import time

from dopd.messages import Role


def cluster_snapshot(ctl) -> dict:
    """Workers, queues, recent latency against the SLOs, the role log and the policy's view, of a
    `Controller`. Times are seconds on the controller's clock (since it started)."""
    now = time.monotonic()
    workers = []
    for w in ctl.workers.values():
        s = w.stats
        move = ctl.moves.get(w.id)
        busy = s.num_running or s.num_waiting
        workers.append({
            "id": w.id, "pid": w.pid, "role": w.role.name.lower(),
            "target_role": move.target.name.lower() if move else None,
            "state": w.state.name.lower(), "num_running": s.num_running, "num_waiting": s.num_waiting,
            "num_parked": s.num_parked, "kv_blocks_total": s.kv_blocks_total, "kv_blocks_free": s.kv_blocks_free,
            "kv_blocks_cached": s.kv_blocks_cached,
            "step_time": s.step_time if busy else None, "step_tokens": s.step_tokens if busy else 0,
            "pending_prefill_tokens": ctl.pending_prefill_tokens[w.id], "restarts": w.restarts,
        })
    queues = {"unplaced": len(ctl.unplaced), "handoff": len(ctl.handoffs)}
    for role in Role:
        name = role.name.lower()
        queues[name] = sum(x["num_waiting"] for x in workers if x["role"] == name)
    return {
        "time": now - ctl.started_at, "num_requests": len(ctl.requests), "workers": workers, "queues": queues,
        "latency": ctl.telemetry.summary(now, now - ctl.started_at), "role_changes": list(ctl.move_log),
        "moves_in_progress": [m.describe() for m in ctl.moves.values()],
        "policy": ctl.policy.describe() if ctl.policy is not None else None,
    }
