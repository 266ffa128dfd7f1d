"""A request as the front end sees it: tokens in, text and logprobs out, and when each thing happened.

Token ids arrive from whichever worker holds the request (the prefill worker's first token, then
the decode worker's); this object turns them into text, applies stop strings, keeps the logprobs,
and stamps its lifetime on one monotonic clock (the main process's).
"""

from __future__ import annotations

import time
from enum import IntEnum

from dopd.detokenizer import IncrementalDetokenizer
from dopd.messages import TokenOutput
from dopd.outputs import CompletionOutput, Logprob, RequestOutput
from dopd.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    """Ordered: a request only moves forward."""

    QUEUED = 0  # accepted, not yet on a worker
    PREFILLING = 1
    HANDOFF = 2  # prefilled, its KV on its way to a decode worker
    DECODING = 3
    FINISHED = 4


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, tokenizer, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.stop)
        self.status = RequestStatus.QUEUED
        self.output_token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_cached_tokens: int | None = None  # prompt tokens the prefill worker's prefix cache held

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def add_token(self, out: TokenOutput, now: float | None = None) -> bool:
        """Take one generated token; True if the request is now finished (stop string included)."""
        now = time.monotonic() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_token_ids.append(out.token_id)
        if out.num_cached_tokens is not None:
            self.num_cached_tokens = out.num_cached_tokens
        if self.logprobs is not None:
            self.logprobs.append(self._token_logprobs(out))
            self.cumulative_logprob += out.logprob
        if self.detok.add(out.token_id):
            self.finish("stop", self.detok.stop_reason, now)
        elif out.finish_reason is not None:
            self.detok.flush()
            # As vLLM: the stop token id when one of stop_token_ids ended it, None at EOS.
            stop = out.token_id if out.finish_reason == "stop" and out.token_id in self.params.stop_token_ids else None
            self.finish(out.finish_reason, stop, now)
        return self.finished

    def finish(self, reason: str, stop_reason: int | str | None = None, now: float | None = None,
               error: str | None = None) -> None:
        if self.finished:
            return
        self.status = RequestStatus.FINISHED
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error
        self.finished_time = time.monotonic() if now is None else now

    def take_text(self) -> str:
        """Text generated since the last call (held back near a possible stop string)."""
        return self.detok.delta(self.finished)

    def _token_logprobs(self, out: TokenOutput) -> dict[int, Logprob]:
        entry = {out.token_id: Logprob(out.logprob, out.rank, self.token_text(out.token_id))}
        for rank, (tid, lp) in enumerate(zip(out.top_ids or [], out.top_logprobs or []), start=1):
            entry.setdefault(tid, Logprob(lp, rank, self.token_text(tid)))
        return entry

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(0, self.detok.text, list(self.output_token_ids), self.cumulative_logprob,
                                      self.logprobs, self.finish_reason, self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [completion], self.finished,
                             self.num_cached_tokens)
