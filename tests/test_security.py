"""Security: loopback by default; with --api-key every route but /health needs the key (401 JSON
otherwise, whatever is sent in its place); nothing from a client is ever unpickled."""

from __future__ import annotations

import ast
import http.client
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from serverproc import REPO, ServerProcess

KEY = "s3cret-key-0123456789"
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/cluster"), ("GET", "/metrics"), ("GET", "/openapi.json"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/cluster/roles"),
             ("GET", "/no/such/route")]
BODIES = {"/v1/completions": {"prompt": "hi", "max_tokens": 3},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
          "/v1/cluster/roles": {"roles": {}}}


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "tiny", "--engine", "mock", "--gpus", "2", "--mode", "static",
                           "--api-key", KEY, "--log-level", "warning")
    yield server
    assert server.stop() == 0, server.logs()


def request(server: ServerProcess, method: str, path: str, auth: bytes | None) -> tuple[int, dict, dict]:
    """One request with a raw Authorization header (bytes: any value a client might send)."""
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = json.dumps(BODIES[path]).encode() if path in BODIES else None
    conn.putrequest(method, path)
    conn.putheader("Content-Type", "application/json")
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    if auth is not None:
        conn.putheader("Authorization", auth)
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data.startswith(b"{") else {}


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_binds_loopback_by_default(server):
    u = urlparse(server.url)
    assert u.hostname == "127.0.0.1"
    assert listening_addresses(u.port) == {"0100007F"}  # 127.0.0.1, nothing else, no wildcard


@pytest.mark.parametrize("auth", [None, b"", b"Bearer", b"Bearer ", b"Bearer wrong", b"Bearer " + b"x" * len(KEY),
                                  b"bearer " + KEY.encode(), KEY.encode(), b"Bearer " + KEY.encode() + b"x",
                                  b"Bearer " + KEY.encode()[:-1], b"Bearer " + b"k" * 5000,
                                  "Bearer ключ".encode(), b"Bearer \xff\xfe", b"Basic dXNlcjpwYXNz"],
                         ids=lambda a: "none" if a is None else repr(a[:24]))
def test_every_route_but_health_needs_the_key(server, auth):
    for method, path in PROTECTED:
        status, headers, body = request(server, method, path, auth)
        assert status == 401, (method, path, status, body)
        assert headers["Content-Type"].startswith("application/json")
        assert body["error"]["type"] == "authentication_error" and body["error"]["message"]
    assert request(server, "GET", "/health", auth)[0] == 200


def test_the_right_key_works(server):
    auth = b"Bearer " + KEY.encode()
    for method, path in PROTECTED:
        status, _, body = request(server, method, path, auth)
        assert status == (404 if path == "/no/such/route" else 200), (path, status, body)
    status, _, body = request(server, "POST", "/v1/completions", auth)
    assert body["usage"]["completion_tokens"] == 3


def test_the_openai_client_with_and_without_the_key(server):
    import openai

    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-it", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)


def test_still_serving_after_bad_keys(server):
    assert request(server, "GET", "/health", None)[0] == 200
    assert request(server, "POST", "/v1/completions", b"Bearer " + KEY.encode())[0] == 200


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


@pytest.mark.parametrize("module", ["dopd/api.py", "dopd/controller.py", "dopd/protocol.py", "dopd/messages.py",
                                    "dopd/server.py"])
def test_request_path_never_unpickles(module):
    assert not imported_modules(REPO / module) & UNPICKLERS


def test_worker_messages_are_msgspec_structs():
    import typing

    import msgspec

    from dopd.messages import FromWorker, ToWorker

    for union in (ToWorker, FromWorker):
        for kind in typing.get_args(union):
            assert issubclass(kind, msgspec.Struct), kind


def test_controller_side_unpickles_only_the_workers_handshake():
    """The controller process unpickles one thing: a worker's KV pool descriptor in its READY
    handshake (from its own child, before anything else is read). Frames after it are msgspec;
    a pickled frame arriving later is dropped, never loaded."""
    source = (REPO / "dopd/workers/handle.py").read_text()
    tree = ast.parse(source)
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "loads"]
    assert len(loads) == 1
    handshake = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                     and node.name == "_recv_handshake")
    assert loads[0] in list(ast.walk(handshake))
    assert "frame[:1] == PICKLE_FRAME" in source  # the reader's guard after the handshake
