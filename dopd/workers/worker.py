"""The worker process: one per GPU (or CPU slot), spawned by the controller, running one engine.

Start-up handshake, the only time anything is pickled:
  1. worker → controller: `Ready` (msgspec) followed by its KV pool, pickled by `torch.multiprocessing`
     (shared memory on CPU, a CUDA IPC handle on GPU); the mock engine has no pool and sends None.
  2. controller → worker: each peer's pool, the same way (`PeerPool`), now and whenever a peer
     is respawned.
After that, typed msgspec messages carrying block ids, both ways.

The loop: take every pending message, run one engine step if there is work, send what the step
produced. An idle worker blocks on its pipe, so it costs nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import msgspec

from dopd.engine import EngineCore
from dopd.kv.pool import KVPool
from dopd.messages import Ping, Pong, Shutdown, StepResult, ToWorker, WorkerError
from dopd.workers.runner import RunnerSpec

log = logging.getLogger("dopd.worker")

# A pickled frame starts with this byte; msgspec frames (msgpack arrays) never do.
PICKLE_FRAME = b"\x00"


class Ready(msgspec.Struct, tag=True, array_like=True):
    worker_id: int
    pid: int
    num_blocks: int
    block_size: int
    device: str


@dataclass(frozen=True, slots=True)
class PeerPool:
    worker_id: int
    pool: object  # a CPU torch.Tensor in shared memory, or None (mock engine, or CUDA: see pool_bytes)
    pool_bytes: bytes | None = None  # a CUDA pool's pickled IPC handle, opened by the receiver


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker_id: int
    runner: RunnerSpec | None  # the real engine
    mock: object | None  # a MockSpec (dopd.workers.mock) for the mock engine
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: frozenset[int]
    log_level: int = logging.WARNING
    prefix_caching: bool = True


def pickled_frame(obj) -> bytes:
    return PICKLE_FRAME + bytes(ForkingPickler.dumps(obj))


def send_pickled(conn, obj) -> None:
    conn.send_bytes(pickled_frame(obj))


def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of the spawned process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the controller's to handle
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s worker{spec.worker_id} %(levelname)s %(message)s")
    encoder = msgspec.msgpack.Encoder()
    try:
        runner = _make_runner(spec)
        engine = EngineCore(runner, spec.max_num_seqs, spec.max_num_batched_tokens, spec.eos_token_ids,
                            spec.prefix_caching)
        pool = getattr(runner, "pool", None)
        conn.send_bytes(encoder.encode(Ready(spec.worker_id, os.getpid(), runner.num_blocks, runner.block_size,
                                             str(getattr(runner, "device", "cpu")))))
        send_pickled(conn, pool.tensor if pool is not None else None)
        _serve(engine, runner, conn, encoder)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the controller is gone: nothing to report to
    except Exception as exc:
        log.exception("worker %d failed", spec.worker_id)
        try:
            conn.send_bytes(encoder.encode(WorkerError(f"{type(exc).__name__}: {exc}")))
        except OSError:
            pass


def _make_runner(spec: WorkerSpec):
    if spec.mock is not None:
        from dopd.workers.mock import MockRunner

        return MockRunner(spec.mock)
    from dopd.workers.runner import ModelRunner

    return ModelRunner(spec.runner)


def _serve(engine: EngineCore, runner, conn, encoder) -> None:
    decoder = msgspec.msgpack.Decoder(ToWorker)
    while True:
        # Busy: take what is there and step. Idle, or stalled (waiting work that no step can start
        # until blocks are freed): block until the controller says something, then take whatever
        # else came with it.
        timeout = 0 if engine.has_work() and not engine.stalled else None
        handled = False
        while conn.poll(timeout):
            timeout = 0
            frame = conn.recv_bytes()
            if frame[:1] == PICKLE_FRAME:
                peer: PeerPool = pickle.loads(frame[1:])
                pool = pickle.loads(peer.pool_bytes) if peer.pool_bytes is not None else peer.pool
                if pool is not None:
                    runner.peer_pools[peer.worker_id] = KVPool(pool)
                continue
            msg = decoder.decode(frame)
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, Ping):
                conn.send_bytes(encoder.encode(Pong(msg.sent_at, engine.stats())))
                continue
            engine.handle(msg)
            handled = True
        # Acks of adoptions and parked migrations go out now, not a whole step later: the controller
        # frees the source's blocks, or starts the next hop, that much sooner.
        events = engine.take_events() if handled and engine.has_work() else None
        if events is not None:
            conn.send_bytes(encoder.encode(events))
        busy = engine.has_work()
        result: StepResult = engine.step()
        # Also after an idle worker handled a message: a release or an abort changes its free blocks.
        if result.outputs or result.parked or result.adopted or result.aborted or busy or handled:
            conn.send_bytes(encoder.encode(result))

