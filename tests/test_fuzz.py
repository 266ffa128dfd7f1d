"""Fuzz the OpenAI routes with hypothesis: bodies shaped like completions and chat requests, with
wrong types, missing fields, huge and negative numbers, unicode and nested junk, and raw bytes.
Every answer is a 2xx or a 4xx with a JSON body (a stream ends with [DONE]), never a 5xx or a hang;
and the server is healthy afterwards, its pools whole.

The real CPU engine serves (its sampler sees whatever passes validation), with a 64-token context
so that an accepted request is short."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverproc import ServerProcess

MAX_MODEL_LEN = 64
VOCAB = 4096
TIMEOUT = 30  # seconds: a request that takes longer has hung
EXAMPLES = int(os.environ.get("DOPD_FUZZ_EXAMPLES", 120))  # more for a deeper search
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "tiny", "--gpus", "2", "--mode", "static", "--max-model-len",
                           str(MAX_MODEL_LEN), "--kv-cache-gb", "0.02", "--log-level", "warning")
    yield server
    assert server.stop() == 0, server.logs()


def post(server: ServerProcess, path: str, data: bytes) -> tuple[int, str, bytes]:
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def check(server: ServerProcess, path: str, data: bytes) -> None:
    status, content_type, body = post(server, path, data)  # a hang raises TimeoutError here
    assert status < 500, (status, data[:300], body[:500])
    if content_type.startswith("text/event-stream"):
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[-300:]
        return
    assert content_type.startswith("application/json"), (status, content_type)
    reply = json.loads(body)
    if status >= 400:
        assert reply["error"]["message"] and reply["error"]["type"], reply
    else:
        assert reply["choices"], reply


# ---- strategies ---------------------------------------------------------------------------------

numbers = (st.integers(-5, 70) | st.integers() | st.integers(min_value=2**62, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.floats(-2, 3))
junk = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
texts = st.text(max_size=80) | st.text(st.characters(codec="utf-8"), max_size=30) | st.just("")
token_ids = st.lists(st.integers(-3, VOCAB + 3) | st.integers(), max_size=80)


sampling = {  # the right types, with values in range and out of it
    "model": st.sampled_from(["tiny", "gpt-4", ""]),
    "max_tokens": st.none() | st.integers(-3, 80) | st.integers(),
    "temperature": st.none() | st.floats(-1, 200, allow_nan=False) | st.just(0.0),
    "top_p": st.none() | st.floats(-1, 2, allow_nan=False) | st.just(1.0),
    "top_k": st.none() | st.integers(-3, 5000) | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "seed": st.none() | st.integers(min_value=-(2**64), max_value=2**64),
    "stop": st.none() | texts | st.lists(texts, max_size=20),
    "stop_token_ids": st.none() | token_ids,
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "n": st.integers(-1, 3) | st.just(1),
    "presence_penalty": st.just(0.0) | st.floats(-2, 2),
    "user": st.text(max_size=10),
}
prompts = texts | token_ids | st.lists(texts, max_size=3) | st.lists(token_ids, max_size=3)
completion_fields = {**sampling, "logprobs": st.none() | st.integers(-2, 25), "echo": st.booleans(),
                     "best_of": st.none() | st.integers(-1, 3), "suffix": st.none() | st.text(max_size=5)}
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                       optional={"text": texts}), max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"])},
                                          optional={"content": st.none() | texts | parts}), max_size=4)
chat_fields = {**sampling, "logprobs": st.booleans(), "top_logprobs": st.none() | st.integers(-1, 25),
               "max_completion_tokens": st.none() | st.integers(-2, 80)}


def bodies(required: dict, optional: dict):
    """Well-typed bodies; the same with a few fields (required ones included) turned to junk or
    dropped, and unknown fields added; and plain junk."""
    typed = st.fixed_dictionaries(required, optional=optional)

    def spoil(body: dict, data) -> dict:
        keys = sorted(set(body) | set(required))
        for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            if data.draw(st.booleans()):
                body[key] = data.draw(junk)
            else:
                body.pop(key, None)
        body.update(data.draw(st.dictionaries(st.text(max_size=8), junk, max_size=2)))
        return body

    spoiled = st.builds(spoil, typed, st.data())
    return typed | spoiled | junk


completion_bodies = bodies({"prompt": prompts}, completion_fields)
chat_bodies = bodies({"messages": messages}, chat_fields)


def encode(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(server, body):
    check(server, "/v1/completions", encode(body))


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(server, body):
    check(server, "/v1/chat/completions", encode(body))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=st.binary(max_size=200) | junk.map(lambda v: json.dumps(v).encode()))
def test_fuzz_raw_bodies(server, data):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/cluster/roles"):
        check(server, path, data)


def test_healthy_after_fuzzing(server):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    status, _, body = post(server, "/v1/completions", json.dumps({"prompt": "hello", "max_tokens": 5}).encode())
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 5
    snap = server.wait_idle()
    assert snap["num_requests"] == 0
    for w in snap["workers"]:
        assert w["state"] == "serving" and w["restarts"] == 0, snap["workers"]  # nothing it was sent killed it
        assert w["kv_blocks_free"] == w["kv_blocks_total"], snap["workers"]
