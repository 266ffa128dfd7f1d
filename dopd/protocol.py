"""The OpenAI-compatible request bodies, as msgspec structs (vLLM's extra fields included).

Decoding a body into these structs *is* the type validation: a wrong type gets msgspec's message,
which names the offending field (`Expected int, got str - at $.max_tokens`). Integers are bounded
to 64 bits, what the msgpack pipe to the workers carries; the ranges that make sense are checked
where the value is used (`SamplingParams.validate`, the API).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    model: str | None = None
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionBody(_Sampling, kw_only=True):
    # str, list[str], list[int] or list[list[int]]: msgspec allows one list type per union, so the
    # shape is checked after decoding (api.py).
    prompt: str | list[str | int | list[int]]
    logprobs: Int | None = None
    echo: bool = False
    best_of: Int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: Int | None = None
    max_completion_tokens: Int | None = None


class RolesBody(msgspec.Struct):
    roles: dict[str, str]
    reason: str = "manual"
    migrate: bool | None = None  # running decodes of a worker leaving decode: migrate (true), drain (false), or
    # let the controller choose by cost (null)


def message_text(message: ChatMessage) -> str:
    """A message's text: the string itself, or its text parts joined (other part types are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ValueError(f"message content of type {part.type!r} is not supported; only text")
        texts.append(part.text)
    return "".join(texts)
