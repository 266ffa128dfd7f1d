"""Every message that crosses a process boundary: typed msgspec structs, nothing pickled.

The one exception is the start-up handshake: a worker's READY carries its KV pool tensor, and the
controller passes every pool to every worker once (`torch.multiprocessing` shares the memory).
After that only these structs, with block ids, cross the pipes.

A request's life on the workers, in messages:
  controller → P  `AddRequest(hand_off=True)`   P prefills, samples the first token, keeps the KV
  P → controller  `TokenOutput` + `Parked`      the first token (TTFT) and the block ids holding its KV
  controller → D  `AdoptRequest`                D allocates blocks and pulls the KV from P's pool
  D → controller  `Adopted(ok)`                 the copy has landed (or failed)
  controller → P  `ReleaseRequest`              P frees its blocks
  D → controller  `TokenOutput`...              decode, until a finish reason
A migration (a decode worker being moved to prefill) is the same from `ExportRequest` on: the
source parks a running sequence and the controller hands it to another decode worker.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

from dopd.sampling_params import SamplingParams


class Role(IntEnum):
    PREFILL = 0
    DECODE = 1
    MIXED = 2  # prefill and decode in one batch (the colocated baseline)
    IDLE = 3  # parked by the policy: serves nothing

    @classmethod
    def parse(cls, name: str) -> "Role":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; choose one of: {', '.join(r.name.lower() for r in cls)}") from None


# ---- controller → worker -------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len by the controller
    hand_off: bool  # prefill only: park after the first token for a decode worker


class AdoptRequest(msgspec.Struct, tag=True, array_like=True):
    """Continue a request whose KV lives in another worker's pool: pull it, then decode."""

    request_id: str
    token_ids: list[int]  # prompt + output so far; KV exists for all but the last
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    src_worker: int
    src_block_ids: list[int]


class ReleaseRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class ResumeRequest(msgspec.Struct, tag=True, array_like=True):
    """Decode a parked request right here: its worker now decodes, so its KV need not move."""

    request_id: str


class ExportRequest(msgspec.Struct, tag=True, array_like=True):
    """Stop decoding a request and park its KV so that another worker can adopt it."""

    request_id: str


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class Ping(msgspec.Struct, tag=True, array_like=True):
    sent_at: float


ToWorker = (AddRequest | AdoptRequest | ReleaseRequest | AbortRequest | ExportRequest | ResumeRequest | Shutdown
            | Ping)


# ---- worker → controller -------------------------------------------------------------------------


class TokenOutput(msgspec.Struct, array_like=True):
    request_id: str
    token_id: int
    finish_reason: str | None = None  # "stop" | "length"
    logprob: float | None = None
    rank: int | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    num_cached_tokens: int | None = None  # on a request's first token: prompt tokens the prefix cache held


class Parked(msgspec.Struct, array_like=True):
    """A request's KV waits in these blocks for a decode worker to pull it."""

    request_id: str
    block_ids: list[int]
    token_ids: list[int]  # prompt + output so far (KV for all but the last)


class Adopted(msgspec.Struct, array_like=True):
    request_id: str
    ok: bool
    error: str = ""
    block_ids: list[int] = []  # where the KV landed (for observability and tests)


class WorkerStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    num_parked: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_preemptions: int
    step_time: float  # seconds of the last step
    step_tokens: int  # tokens in the last step
    num_prefill_tokens: int
    kv_blocks_cached: int = 0  # blocks that hold a registered prefix (in use or free)


class StepResult(msgspec.Struct, tag=True, array_like=True):
    outputs: list[TokenOutput]
    parked: list[Parked]
    adopted: list[Adopted]
    aborted: list[str]  # requests dropped on the controller's order, blocks freed
    stats: WorkerStats


class Pong(msgspec.Struct, tag=True, array_like=True):
    sent_at: float
    stats: WorkerStats


class WorkerError(msgspec.Struct, tag=True, array_like=True):
    """The worker hit an exception it cannot recover from; it exits after sending this."""

    message: str


FromWorker = StepResult | Pong | WorkerError
