"""Run `python dopd.py` as a real subprocess for tests, the way a user starts it; read its SSE streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNING: set["ServerProcess"] = set()  # started and not yet stopped; conftest stops what a test leaves


class ServerProcess:
    def __init__(self, *args: str, startup_timeout: float = 180.0) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dopd-server-", suffix=".log", delete=False)
        cmd = [sys.executable, str(REPO / "dopd.py"), "--port", "0", "--no-monitor", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + startup_timeout
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("DOPD serving"):
                self.url = line.split(" at ")[1].split()[0]
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(f"server did not start:\n{self.logs()}")
        RUNNING.add(self)

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until no request is in flight and every worker's pool is whole; return the snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.get("/v1/cluster")
            whole = all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in snap["workers"])
            if (whole and snap["num_requests"] == 0) or time.monotonic() > deadline:
                return snap
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        RUNNING.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "a condition"):
    """Poll `predicate()` until it returns something truthy (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class StreamResult:
    """How one streamed request ended, as the client saw it."""

    status: int = 0
    text: str = ""
    num_chunks: int = 0  # data events that carried choices
    error: dict | None = None  # the `error` of an error event (or of a non-200 JSON body)
    done: bool = False  # `data: [DONE]` arrived
    cut: bool = False  # the client hung up on purpose
    usage: dict | None = None  # from the usage chunk (stream_options.include_usage)
    headers: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None


async def stream_request(session, url: str, body: dict, path: str = "/v1/completions",
                         cut_after: int | None = None, on_chunk=None) -> StreamResult:
    """POST a streaming request with aiohttp and parse its SSE events. `cut_after`: hang up after
    that many chunks; `on_chunk(result)`: called after each chunk (to watch progress)."""
    result = StreamResult()
    async with session.post(url + path, json={**body, "stream": True}) as resp:
        result.status, result.headers = resp.status, dict(resp.headers)
        if resp.status != 200:
            result.error = (await resp.json(content_type=None)).get("error")
            return result
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                result.done = True
                break
            event = json.loads(data)
            if "error" in event:
                result.error = event["error"]
                continue
            if event.get("usage"):
                result.usage = event["usage"]
            for choice in event.get("choices", []):
                result.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if event.get("choices"):
                result.num_chunks += 1
                if on_chunk is not None:
                    on_chunk(result)
                if cut_after is not None and result.num_chunks >= cut_after:
                    result.cut = True
                    return result  # leaving the context closes the connection mid-stream
    return result
