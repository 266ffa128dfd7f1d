"""A fixed set of bad requests: each gets the right 4xx with an OpenAI-style JSON error whose message
says what is wrong; afterwards the server is healthy and serves a normal request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from serverproc import ServerProcess

MAX_MODEL_LEN = 128
VOCAB = 4096  # the tiny tokenizer's
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "tiny", "--engine", "mock", "--gpus", "2", "--mode", "static",
                           "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning")
    yield server
    assert server.stop() == 0, server.logs()


def call(server: ServerProcess, path: str, body=None, method: str = "POST", raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# (route, body, what the message must say)
BAD = [
    ("malformed JSON", CMPL, b'{"prompt": "x",', "not valid JSON"),
    ("not JSON at all", CMPL, b"\xff\xfe garbage", "not valid JSON"),
    ("empty body", CMPL, b"", "not valid JSON"),
    ("NaN is not JSON", CMPL, b'{"prompt": "x", "temperature": NaN}', "not valid JSON"),
    ("lone surrogate", CMPL, b'{"prompt": "\\ud800"}', "not valid JSON"),
    ("nested too deep", CMPL, b'{"prompt": "x", "junk": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ("body is a list", CMPL, [1, 2], "Expected `object`"),
    ("prompt missing", CMPL, {"max_tokens": 5}, "missing required field `prompt`"),
    ("prompt wrong type", CMPL, {"prompt": 5}, "$.prompt"),
    ("max_tokens wrong type", CMPL, {"prompt": "x", "max_tokens": "5"}, "$.max_tokens"),
    ("temperature wrong type", CMPL, {"prompt": "x", "temperature": "hot"}, "$.temperature"),
    ("stream wrong type", CMPL, {"prompt": "x", "stream": "yes"}, "$.stream"),
    ("prompt too long", CMPL, {"prompt": [300] * MAX_MODEL_LEN}, "maximum context length"),
    ("prompt + max_tokens too long", CMPL, {"prompt": [300] * 100, "max_tokens": 29}, "maximum context length"),
    ("max_tokens 0", CMPL, {"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
    ("max_tokens negative", CMPL, {"prompt": "x", "max_tokens": -5}, "max_tokens must be at least 1"),
    ("max_tokens over the limit", CMPL, {"prompt": "x", "max_tokens": 10**6}, "maximum context length"),
    ("max_tokens past 64 bits", CMPL, {"prompt": "x", "max_tokens": 2**70}, "$.max_tokens"),
    ("seed past 64 bits", CMPL, {"prompt": "x", "seed": 2**70}, "$.seed"),
    ("stop token past 64 bits", CMPL, {"prompt": "x", "stop_token_ids": [2**64]}, "$.stop_token_ids"),
    ("temperature too high", CMPL, {"prompt": "x", "temperature": 1e9}, "temperature must be in"),
    ("temperature out of float range", CMPL, b'{"prompt": "x", "temperature": 1e400}', "$.temperature"),
    ("top_p zero", CMPL, {"prompt": "x", "top_p": 0}, "top_p must be in"),
    ("unknown model", CMPL, {"prompt": "x", "model": "gpt-4"}, "does not exist"),
    ("empty prompt", CMPL, {"prompt": ""}, "prompt must not be empty"),
    ("empty prompt list", CMPL, {"prompt": []}, "prompt must not be empty"),
    ("empty token list", CMPL, {"prompt": [[]]}, "prompt must not be empty"),
    ("mixed prompt list", CMPL, {"prompt": ["a", 5]}, "prompt must be a string"),
    ("token id past the vocabulary", CMPL, {"prompt": [1, 2, VOCAB]}, f"[0, {VOCAB})"),
    ("negative token id", CMPL, {"prompt": [-1]}, f"[0, {VOCAB})"),
    ("too many stop strings", CMPL, {"prompt": "x", "stop": ["a"] * 17}, "at most 16 stop strings"),
    ("too long a stop string", CMPL, {"prompt": "x", "stop": "a" * 257}, "at most 256 characters"),
    ("empty stop string", CMPL, {"prompt": "x", "stop": [""]}, "stop strings must not be empty"),
    ("n > 1", CMPL, {"prompt": "x", "n": 2}, "n must be 1"),
    ("echo", CMPL, {"prompt": "x", "echo": True}, "echo is not supported"),
    ("suffix", CMPL, {"prompt": "x", "suffix": "y"}, "suffix is not supported"),
    ("best_of", CMPL, {"prompt": "x", "best_of": 2}, "best_of > 1 is not supported"),
    ("penalties", CMPL, {"prompt": "x", "presence_penalty": 1.0}, "not supported"),
    ("too many logprobs", CMPL, {"prompt": "x", "logprobs": 21}, "logprobs must be in"),
    ("empty messages", CHAT, {"messages": []}, "messages must not be empty"),
    ("messages missing", CHAT, {"max_tokens": 3}, "missing required field `messages`"),
    ("message not an object", CHAT, {"messages": ["hi"]}, "$.messages[0]"),
    ("message without role", CHAT, {"messages": [{"content": "hi"}]}, "`role`"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
    ("chat n > 1", CHAT, {"messages": HI, "n": 3}, "n must be 1"),
    ("chat unknown model", CHAT, {"messages": HI, "model": "nope"}, "does not exist"),
    ("chat max_completion_tokens 0", CHAT, {"messages": HI, "max_completion_tokens": 0}, "at least 1"),
    ("chat too long", CHAT, {"messages": [{"role": "user", "content": "word " * 300}]}, "maximum context length"),
    ("top_logprobs without logprobs", CHAT, {"messages": HI, "top_logprobs": 2}, "needs logprobs"),
    ("chat stop strings", CHAT, {"messages": HI, "stop": ["x"] * 40}, "at most 16 stop strings"),
    ("roles: unknown worker", "/v1/cluster/roles", {"roles": {"7": "decode"}}, "no live worker 7"),
    ("roles: unknown role", "/v1/cluster/roles", {"roles": {"0": "sideways"}}, "unknown role"),
    ("roles: nothing left to prefill", "/v1/cluster/roles", {"roles": {"0": "decode"}}, "must be able to prefill"),
    ("roles: wrong type", "/v1/cluster/roles", {"roles": {"0": "decode"}, "migrate": "yes"}, "$.migrate"),
]


@pytest.mark.parametrize("path, body, says", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_request_is_400_with_a_message(server, path, body, says):
    status, headers, reply = call(server, path, raw=body if isinstance(body, bytes) else None,
                                  body=None if isinstance(body, bytes) else body)
    assert status == 400, reply
    assert headers["Content-Type"].startswith("application/json")
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert says in error["message"], error["message"]


def num_requests_seen(server: ServerProcess) -> float:
    """Requests the server has run to an end, whatever the outcome (its Prometheus counter)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        return sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                   if line.startswith("dopd:requests_total{"))


def test_batch_with_one_bad_prompt_runs_none_of_it(server):
    before = num_requests_seen(server)
    status, _, reply = call(server, CMPL, {"prompt": ["fine", "x " * 200], "max_tokens": 5})
    assert status == 400 and "maximum context length" in reply["error"]["message"]
    assert server.wait_idle()["num_requests"] == 0
    assert num_requests_seen(server) == before  # the good first prompt was not started either


def test_oversized_body_is_413_json(server):
    status, headers, reply = call(server, CMPL, raw=b'{"prompt": "' + b"a" * (16 * 2**20 + 10) + b'"}')
    assert status == 413 and headers["Content-Type"].startswith("application/json")
    assert "too large" in reply["error"]["message"]


@pytest.mark.parametrize("path, method, status", [("/v1/nothing", "GET", 404), ("/", "POST", 404),
                                                  (CMPL, "GET", 405), ("/v1/models", "POST", 405),
                                                  ("/health", "DELETE", 405)])
def test_unknown_routes_and_methods_are_json(server, path, method, status):
    got, headers, reply = call(server, path, method=method, raw=b"{}" if method != "GET" else None)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert reply["error"]["code"] == status and reply["error"]["message"]


def test_openapi_schema_is_published(server):
    status, _, schema = call(server, "/openapi.json", method="GET")
    assert status == 200 and schema["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/cluster/roles"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["CompletionBody"]["properties"]
    assert "prompt" in props and "max_tokens" in props


def test_still_healthy_afterwards(server):
    assert call(server, "/health", method="GET")[0] == 200
    status, _, reply = call(server, CMPL, {"prompt": "hello", "max_tokens": 5})
    assert status == 200 and reply["usage"]["completion_tokens"] == 5
    status, _, reply = call(server, CHAT, {"messages": HI, "max_tokens": 5})
    assert status == 200 and reply["choices"][0]["message"]["content"]
    snap = server.wait_idle()
    assert snap["num_requests"] == 0 and all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
