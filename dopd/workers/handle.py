"""The controller's handle on one worker process: spawn it, talk to it, notice when it dies.

This is the seam between the control plane and the workers: the controller only sends typed
messages, receives typed results and forwards pool descriptors. The same interface could wrap a
worker on another node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
from collections.abc import Callable
from enum import IntEnum

import msgspec
import torch.multiprocessing as mp

from dopd.messages import FromWorker, Role, WorkerStats
from dopd.workers.worker import PICKLE_FRAME, PeerPool, Ready, WorkerSpec, pickled_frame, worker_main

log = logging.getLogger(__name__)


class WorkerState(IntEnum):
    STARTING = 0
    SERVING = 1
    DRAINING = 2  # finishing its work in the old role before a flip
    MIGRATING = 3  # handing its running decodes to other decode workers before a flip
    DEAD = 4


_encoder = msgspec.msgpack.Encoder()
_ready_decoder = msgspec.msgpack.Decoder(Ready)
_decoder = msgspec.msgpack.Decoder(FromWorker)


class WorkerHandle:
    def __init__(self, spec: WorkerSpec, role: Role) -> None:
        self.spec = spec
        self.id = spec.worker_id
        self.role = role
        self.target_role: Role | None = None  # set while a move is under way
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.num_blocks = 0
        self.block_size = 0
        self.stats = WorkerStats(0, 0, 0, 0, 0, 0, 0.0, 0, 0)
        self.pool = None  # the worker's KV pool as this process holds it (to hand to peers)
        self.pool_bytes: bytes | None = None  # ... or, on CUDA, its pickled IPC handle
        self.reserved_blocks = 0  # promised to adoptions in flight
        self.num_incoming = 0  # adoptions in flight
        self.last_heard = 0.0
        self.restarts = 0
        self.process = None
        self.conn = None
        # Once attached, the pipe is the event loop's and non-blocking (uvloop makes it so): frames go
        # out through `_out` and come in through `_in`, whole, in the `multiprocessing.Connection`
        # framing the worker's blocking end reads and writes.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._in = bytearray()

    # ---- life cycle -----------------------------------------------------------------------------

    def spawn(self) -> None:
        if self.conn is not None:  # a respawn: the old pipe goes with the old process
            self.conn.close()
        self._loop, self._out, self._in = None, bytearray(), bytearray()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(self.spec, child), name=f"dopd-worker-{self.id}",
                                   daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        self.state = WorkerState.STARTING

    async def wait_ready(self, timeout: float) -> None:
        """Wait for READY and the worker's pool; raise if it dies or takes longer than `timeout`."""
        loop = asyncio.get_running_loop()
        ready = await asyncio.wait_for(loop.run_in_executor(None, self._recv_handshake), timeout)
        self.pid, self.num_blocks, self.block_size = ready.pid, ready.num_blocks, ready.block_size
        self.stats = WorkerStats(0, 0, 0, ready.num_blocks, ready.num_blocks, 0, 0.0, 0, 0)
        self.state = WorkerState.SERVING

    def _recv_handshake(self) -> Ready:
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"worker {self.id} exited with code {self.process.exitcode} while starting")
        frame = self.conn.recv_bytes()
        try:
            ready = _ready_decoder.decode(frame)
        except msgspec.DecodeError:
            raise RuntimeError(f"worker {self.id} failed to start: {_decoder.decode(frame)}") from None
        pool_frame = self.conn.recv_bytes()[1:]
        if ready.device.startswith("cuda"):
            # Forwarded as it came: unpickling here would open the IPC handle and put a CUDA
            # context in the controller. Each peer opens it in its own process.
            self.pool_bytes = pool_frame
        else:
            # Held here, re-pickled for each peer: a CPU shared-memory fd can be passed on only once
            # per pickle.
            self.pool = pickle.loads(pool_frame)
        return ready

    def share_pool_with(self, peer: "WorkerHandle") -> None:
        peer._send_frame(pickled_frame(PeerPool(self.id, self.pool, self.pool_bytes)))

    def attach(self, on_message: Callable[["WorkerHandle", object], None],
               on_exit: Callable[["WorkerHandle"], None]) -> None:
        """Deliver this worker's messages, and its death, to the event loop."""
        loop = asyncio.get_running_loop()
        fd = self.conn.fileno()
        os.set_blocking(fd, False)
        self._loop = loop

        def readable() -> None:
            try:
                while True:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        raise EOFError
                    self._in += chunk
            except BlockingIOError:
                pass
            except (EOFError, OSError):
                self.detach()
                on_exit(self)
                return
            for frame in self._frames():
                if frame[:1] == PICKLE_FRAME:
                    continue
                try:
                    on_message(self, _decoder.decode(frame))
                except Exception:  # a bug in handling one message must not drop the frames after it
                    log.exception("worker %d: handling a message failed", self.id)

        def exited() -> None:
            self.detach()
            on_exit(self)

        loop.add_reader(fd, readable)
        loop.add_reader(self.process.sentinel, exited)
        if self._out:
            loop.add_writer(fd, self._flush)

    def _frames(self) -> list[bytes]:
        """Take the whole frames received so far off `_in` (a partial one stays for the next read)."""
        frames, buf, pos = [], self._in, 0
        while len(buf) - pos >= 4:
            (size,) = struct.unpack_from("!i", buf, pos)
            start = pos + 4
            if size == -1:  # a frame over 2 GiB: the size follows as 8 bytes
                if len(buf) - start < 8:
                    break
                (size,) = struct.unpack_from("!Q", buf, start)
                start += 8
            if len(buf) - start < size:
                break
            frames.append(bytes(buf[start:start + size]))
            pos = start + size
        del buf[:pos]
        return frames

    def detach(self) -> None:
        loop = asyncio.get_event_loop()
        for fd in (self._fileno(), getattr(self.process, "sentinel", None)):
            if fd is not None:
                loop.remove_reader(fd)
        fd = self._fileno()
        if fd is not None and self._loop is not None:
            loop.remove_writer(fd)
        self._loop = None

    def _fileno(self) -> int | None:
        try:
            return self.conn.fileno() if self.conn is not None else None
        except OSError:
            return None

    def send(self, msg) -> bool:
        if self.state == WorkerState.DEAD or self.conn is None:
            return False
        return self._send_frame(_encoder.encode(msg))

    def _send_frame(self, payload: bytes) -> bool:
        """Queue one frame, in order. Unattached (start-up, tests), the pipe is blocking: write it now."""
        if self.conn is None:
            return False
        size = len(payload)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        try:
            if self._loop is None:
                self.conn.send_bytes(payload)
                return True
            idle = not self._out
            self._out += header
            self._out += payload
            if idle:
                self._flush()
                if self._out and self._loop is not None:
                    self._loop.add_writer(self.conn.fileno(), self._flush)
            return True
        except OSError:
            return False

    def _flush(self) -> None:
        """Write what the pipe takes now; the event loop calls again when it takes more."""
        fd = self._fileno()
        try:
            while self._out:
                n = os.write(fd, self._out)
                del self._out[:n]
        except BlockingIOError:
            return
        except (OSError, TypeError):  # the worker is gone: its exit is handled by the sentinel
            self._out.clear()
        if self._loop is not None and fd is not None:
            self._loop.remove_writer(fd)

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def join(self, timeout: float) -> None:
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(1.0)

    # ---- load, as the controller sees it --------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.state != WorkerState.DEAD

    @property
    def kv_blocks_available(self) -> int:
        return self.stats.kv_blocks_free - self.reserved_blocks
