"""Run `python dopd.py` as a real subprocess for tests, the way a user starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
