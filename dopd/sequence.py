"""A worker's view of one request: its tokens, how many have KV in the cache, and its blocks.

One rule covers prefill, decode, chunked prefill, recompute after preemption, a sequence adopted
from another worker and a prompt whose first blocks the prefix cache already held: the tokens
`token_ids[num_computed_tokens:]` still need a forward pass, and once none are left the next token
is sampled. After a prefill or a handoff exactly one
token (the last sampled one) is pending, which is what a decode step processes.
"""

from __future__ import annotations

from enum import IntEnum

from dopd.sampling_params import SamplingParams


class SeqStatus(IntEnum):
    WAITING = 0  # needs blocks and a prefill (new, or preempted and to be recomputed)
    RUNNING = 1  # holds blocks, scheduled every step
    PARKED = 2  # holds blocks, not scheduled: awaiting handoff to another worker
    FINISHED = 3


class Sequence:
    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "block_ids",
        "params", "max_tokens", "eos_token_ids", "hand_off", "status", "finish_reason",
        "block_hashes", "num_registered_blocks", "num_cached_tokens",
    )

    def __init__(
        self,
        request_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        hand_off: bool = False,
    ) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.params = params
        self.max_tokens = max_tokens  # resolved: never past max_model_len
        self.eos_token_ids = eos_token_ids
        self.hand_off = hand_off  # stop after the first token and park for a decode worker
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        # Prefix caching: the chain hashes of its full blocks so far (a function of the tokens alone,
        # so they outlive a preemption), how many of `block_ids` are registered under them, and how
        # many prompt tokens the cache held when its prompt was (last) admitted.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> str | None:
        """Add a sampled token; return the finish reason if it ends the sequence."""
        self.token_ids.append(token_id)
        params = self.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            self.finish_reason = "stop"
        elif self.num_output_tokens >= self.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
