"""An in-place role move of one worker, as the controller tracks it.

A move starts serving the new role at once (routing sees the target role from the first moment)
and stops giving the worker work of the old role. It completes — the flip — when no work of the
old role is left on the worker:
- work that only the old role does: prompts being prefilled for a handoff, and KV parked for a
  decode worker, when the new role does not prefill; running decodes when the new role does not
  decode;
- running decodes are either **migrated** (parked and adopted by other decode workers through the
  same KV handoff) or **drained** (left to finish), as chosen when the move starts.
No process restarts and no weights reload: the worker's pool, weights and engine stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dopd.messages import Role

_PREFILLS = (Role.PREFILL, Role.MIXED)
_DECODES = (Role.DECODE, Role.MIXED)


@dataclass(slots=True, eq=False)
class RoleMove:
    worker_id: int
    source: Role
    target: Role
    reason: str
    started_at: float
    migrate: bool = True  # False: let running decodes finish here instead
    exported: set = field(default_factory=set)  # requests sent away by migration

    @property
    def stops_prefill(self) -> bool:
        return self.source in _PREFILLS and self.target not in _PREFILLS

    @property
    def stops_decode(self) -> bool:
        return self.source in _DECODES and self.target not in _DECODES

    @property
    def needs_migration(self) -> bool:
        return self.stops_decode and self.migrate

    def blocks_flip(self, decodes_here: bool, migrating: bool) -> bool:
        """Whether a request on the worker is old-role work that must leave before the flip.

        `decodes_here`: it decodes (or will, or is being pulled in to) on this worker; `migrating`:
        it was exported by this move. Anything else on the worker is prefill work for a handoff.
        """
        if self.stops_decode and (decodes_here or migrating):
            return True
        return self.stops_prefill and not decodes_here and not migrating

    def finish(self, now: float) -> dict:
        return {**self.describe(), "finished_at": now, "duration_ms": (now - self.started_at) * 1e3,
                "num_migrated": len(self.exported)}

    def describe(self) -> dict:
        return {"worker": self.worker_id, "from": self.source.name.lower(), "to": self.target.name.lower(),
                "reason": self.reason, "started_at": self.started_at, "migrate": self.migrate}
