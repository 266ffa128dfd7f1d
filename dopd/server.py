"""`python dopd.py`: resolve the configuration, start the workers and the controller, serve HTTP.

Shutdown (SIGINT/SIGTERM): stop accepting connections, give in-flight requests a grace period,
end the rest with an explicit error, stop every worker; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from dopd.api import Api
from dopd.config import DopdConfig
from dopd.controller import Controller
from dopd.embedded import resolve_model
from dopd.messages import Role
from dopd.metrics import SLO
from dopd.policy.prefix_index import PrefixIndex
from dopd.snapshot import cluster_snapshot
from dopd.telemetry import Telemetry

log = logging.getLogger("dopd")

MOCK_MAX_MODEL_LEN = 16384  # the paper's vLLM setting


@dataclass(frozen=True, slots=True)
class Setup:
    """What the configuration resolves to on this machine."""

    device: str
    engine: str
    model_dir: str
    arch: object  # ModelArch
    model_name: str
    tokenizer: object
    max_model_len: int
    eos_token_ids: frozenset[int]
    max_num_batched_tokens: int
    slo: SLO
    num_workers: int
    roles: list[Role]
    mock: object | None  # the MockSpec, for the mock engine


def resolve(cfg: DopdConfig) -> Setup:
    from dopd.workers import loader

    device = loader.resolve_device(cfg.cluster.device)
    engine = cfg.cluster.engine
    if engine == "auto":
        engine = loader.default_attention(device)
    if engine == "flashinfer" and device.type != "cuda":
        raise ValueError("--engine flashinfer needs a CUDA device; this one has none (use --engine torch)")
    model_dir = resolve_model(cfg.model.model)
    tokenizer = loader.load_tokenizer(model_dir)
    arch = loader.load_arch(model_dir)
    if engine == "mock":  # no weights run: the context limit and the step budget are those of the GPU it mimics
        max_len = cfg.model.max_model_len or MOCK_MAX_MODEL_LEN
        budget = cfg.scheduler.max_num_batched_tokens or loader.default_max_batched_tokens(torch_device("cuda"))
    else:
        max_len = loader.max_model_len(arch, cfg.model.max_model_len)
        budget = cfg.scheduler.max_num_batched_tokens or loader.default_max_batched_tokens(device)
    cpu_engine = engine == "torch" and device.type == "cpu"
    slo = SLO(cfg.server.slo_ttft or (2.0 if cpu_engine else 1.5), cfg.server.slo_tpot or (0.2 if cpu_engine else 0.05))
    mock = None
    num_workers = cfg.cluster.gpus
    if engine == "mock":
        from dopd.workers.mock import mock_spec

        mock = mock_spec(cfg, len(tokenizer))
        tp = mock.cost.num_gpus
        if cfg.cluster.gpus % tp:
            raise ValueError(f"--gpus {cfg.cluster.gpus} is not a multiple of the profile's {tp} GPUs per worker")
        num_workers = cfg.cluster.gpus // tp
    return Setup(str(device), engine, str(model_dir), arch, cfg.model.served_model_name or cfg.model.model, tokenizer,
                 max_len, loader.eos_token_ids(model_dir, tokenizer), budget, slo, num_workers,
                 initial_roles(cfg, num_workers), mock)


PROFILES_DIR = Path(__file__).parent / "profiles"


def cost_model(cfg: DopdConfig, setup: Setup):
    """The cost model the policy plans with: the mock's own, a given profile, or the shipped one
    measured for this model on this kind of device (scripts/profile.py)."""
    from dopd.sim.costmodel import get_profile

    if setup.mock is not None:
        return setup.mock.cost
    if cfg.cluster.model_profile:
        return get_profile(cfg.cluster.model_profile, cfg.cluster.hardware, cfg.cluster.tp)
    shipped = PROFILES_DIR / f"{setup.device.split(':')[0]}-{Path(setup.model_dir).name}.json"
    if not shipped.is_file():
        raise ValueError(f"mode {cfg.cluster.mode} plans with a cost model, and none is shipped for this model on "
                         f"{setup.device} ({shipped.name}): run scripts/profile.py and pass --model-profile FILE")
    return get_profile(str(shipped))


def torch_device(name: str):
    import torch

    return torch.device(name)


def initial_roles(cfg: DopdConfig, num_workers: int) -> list[Role]:
    mode = cfg.cluster.mode
    if mode == "colocated" or num_workers == 1:
        if mode != "colocated":
            log.warning("one worker cannot be split into prefill and decode: serving colocated")
        return [Role.MIXED] * num_workers
    num_prefill, num_decode = cfg.cluster.split(num_workers)
    num_idle = num_workers - num_prefill - num_decode
    return [Role.PREFILL] * num_prefill + [Role.DECODE] * num_decode + [Role.IDLE] * num_idle


def worker_specs(cfg: DopdConfig, setup: Setup) -> list:
    from dopd.workers.runner import RunnerSpec
    from dopd.workers.worker import WorkerSpec

    n = setup.num_workers
    specs = []
    threads = max(1, (os.cpu_count() or 1) // n)
    devices = [f"cuda:{i % _num_cuda()}" if setup.device.startswith("cuda") else "cpu" for i in range(n)]
    for i, device in enumerate(devices):
        runner = None
        if setup.mock is None:
            runner = RunnerSpec(setup.model_dir, device, cfg.model.dtype, setup.engine, setup.max_model_len,
                                cfg.cache.block_size, cfg.cache.num_kv_blocks, cfg.cache.kv_cache_gb, threads,
                                setup.arch, workers_on_device=devices.count(device) if device != "cpu" else 1)
        specs.append(WorkerSpec(i, runner, setup.mock, cfg.scheduler.max_num_seqs, setup.max_num_batched_tokens,
                                setup.eos_token_ids, logging.getLogger().getEffectiveLevel(),
                                cfg.cache.enable_prefix_caching))
    return specs


def _num_cuda() -> int:
    import torch

    return max(1, torch.cuda.device_count())


async def serve(cfg: DopdConfig, ready: asyncio.Event | None = None) -> None:
    from dopd.workers.handle import WorkerHandle

    setup = resolve(cfg)
    if setup.device == "cpu" and setup.engine != "mock":
        log.info("no CUDA device: the %d workers run on the CPU (torch attention, shared-memory KV handoff)",
                 setup.num_workers)
    if setup.mock is not None:
        log.info("mock engine: %d workers of %d GPU(s), each a %s", setup.num_workers, setup.mock.cost.num_gpus,
                 setup.mock.cost.name)
    handles = [WorkerHandle(spec, role) for spec, role in zip(worker_specs(cfg, setup), setup.roles)]
    telemetry = Telemetry(setup.model_name, setup.slo)
    policy, batcher, ultra_short, per_token = None, None, 0, 0.0
    if cfg.cluster.mode not in ("colocated", "static") and setup.num_workers > 1:
        from dopd.policy.base import make_policy
        from dopd.policy.routing import ShortPromptBatcher

        cost = cost_model(cfg, setup)
        policy = make_policy(cfg.cluster.mode, cost, setup.slo, setup.num_workers, cfg.policy)
        per_token = cost.kv_transfer_time(1)
        if cfg.cluster.mode == "dopd":  # the length-aware scheduler is DOPD's, not the baselines'
            ultra_short = cfg.policy.ultra_short_len
            if cfg.policy.short_batch_wait > 0:
                batcher = ShortPromptBatcher(setup.max_num_batched_tokens, cfg.policy.short_batch_wait * setup.slo.ttft)
    controller = Controller(handles, setup.tokenizer, setup.max_model_len, telemetry, cfg.server.request_timeout,
                            cfg.server.handoff_timeout, cfg.server.max_num_requests, policy,
                            policy_interval=cfg.policy.interval, ultra_short_len=ultra_short, batcher=batcher,
                            transfer_time_per_token=per_token, step_token_budget=setup.max_num_batched_tokens,
                            prefix_index=PrefixIndex() if cfg.cache.enable_prefix_caching else None)
    await controller.start()
    api = Api(controller, setup.model_name, cfg.server.api_key)
    runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port)
    await site.start()
    port = runner.addresses[0][1]
    split = "/".join(f"{sum(r == role for r in setup.roles)}{role.name[0]}" for role in Role
                     if any(r == role for r in setup.roles))
    print(f"DOPD serving {setup.model_name} at http://{cfg.server.host}:{port} "
          f"({setup.num_workers} workers {split}, mode {cfg.cluster.mode}, engine {setup.engine} on {setup.device})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    monitor = None
    if cfg.server.monitor and sys.stdout.isatty():
        from dopd.monitor import run_monitor

        monitor = asyncio.create_task(run_monitor(functools.partial(cluster_snapshot, controller), stop))
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down")
    await site.stop()
    await controller.stop(cfg.server.shutdown_grace)
    if monitor is not None:
        monitor.cancel()
    await runner.cleanup()
