"""Configuration: a tree of frozen dataclasses, validated on construction, and the CLI made from it.

Every field with `metadata={"help": ...}` becomes a flag (`max_model_len` → `--max-model-len`), so
the command line and the config cannot drift apart. Field names are unique across the tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENGINES = ("torch", "flashinfer", "mock")
MODES = ("colocated", "static", "dopd", "load_threshold", "sla")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = _opt(DEFAULT_MODEL, "a local Hugging Face checkpoint directory, 'tiny' (random weights, "
                      "for tests), or the embedded default SmolLM2-135M-Instruct")
    served_model_name: str | None = _opt(None, "the model name the API answers to (default: --model as given)")
    dtype: str = _opt("auto", "weights and activations: auto (float32 on CPU, bfloat16 on CUDA), float32, "
                      "bfloat16 or float16", choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's, capped at 4096)")

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = _opt(16, "tokens per KV block")
    num_kv_blocks: int | None = _opt(None, "KV blocks per worker (default: sized from --kv-cache-gb)")
    kv_cache_gb: float | None = _opt(None, "KV pool size per worker in GiB (default: 0.5 on CPU, "
                                     "90% of free memory after weights on CUDA)")
    enable_prefix_caching: bool = _opt(True, "share the KV of prompt prefixes a worker has already computed "
                                       "(a system prompt, an earlier turn) instead of computing it again")

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"--block-size must be in [1, 1024], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"--num-kv-blocks must be at least 1, got {self.num_kv_blocks}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = _opt(128, "most sequences in one worker's running batch")
    max_num_batched_tokens: int | None = _opt(None, "token budget of one engine step (default: 512 on CPU, "
                                              "8192 on CUDA); chunked prefill splits prompts longer than it")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("--max-num-batched-tokens must be at least 1")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    gpus: int = _opt(1, "worker slots: one worker process each, one GPU each on CUDA")
    device: str = _opt("auto", "auto, cpu or cuda (auto: CUDA when there is one)")
    engine: str = _opt("auto", "what a worker runs: torch (paged attention in torch), flashinfer (CUDA), "
                       "mock (sleeps for the cost model's step time), or auto", choices=("auto",) + ENGINES)
    mode: str = _opt("dopd", "colocated (every worker mixed, chunked prefill), static (a fixed P:D split), "
                     "dopd (the dynamic controller), or a baseline planner: load_threshold, sla", choices=MODES)
    pd_ratio: str | None = _opt(None, "prefill:decode workers for static mode and dopd's start, e.g. 1:1 "
                                "(default: half and half)", metavar="P:D")
    hardware: str = _opt("h100", "mock engine: the GPU it pretends to be (h100, h200, a100)")
    model_profile: str | None = _opt(None, "the cost model: a preset (llama3-8b, llama3-70b, llama3-70b-fp8, "
                                     "opt-13b, opt-30b) for the mock engine (default llama3-8b), or a profile file "
                                     "from scripts/profile.py (default for the real engine: the one shipped for "
                                     "the model and device, in dopd/profiles/)", metavar="PROFILE")
    tp: int | None = _opt(None, "mock engine: GPUs per worker (default: the fewest that hold the weights); "
                          "--gpus 8 with tp 2 is 4 workers")
    link: str | None = _opt(None, "mock engine: the KV link, nvlink, pcie or a number of GB/s (default: nvlink)")

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {self.gpus}")
        if self.pd_ratio is not None:
            parse_pd_ratio(self.pd_ratio)
        if self.tp is not None and self.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tp}")

    def split(self, num_workers: int) -> tuple[int, int]:
        """(num prefill, num decode) workers to start with in a disaggregated mode. A dynamic mode
        may start with fewer (the rest idle, for its planner to call on); static uses them all."""
        if self.pd_ratio is None:
            num_prefill = max(1, num_workers // 2)
            return num_prefill, num_workers - num_prefill
        p, d = parse_pd_ratio(self.pd_ratio)
        if p + d > num_workers or (self.mode == "static" and p + d != num_workers):
            raise ValueError(f"--pd-ratio {self.pd_ratio} names {p + d} workers but there are {num_workers}")
        return p, d


def parse_pd_ratio(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--pd-ratio must look like P:D (e.g. 1:1), got {text!r}") from None
    if p < 1 or d < 1:
        raise ValueError(f"--pd-ratio needs at least one prefill and one decode worker, got {text!r}")
    return p, d


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to bind (loopback unless you say otherwise)")
    port: int = _opt(8000, "port to listen on")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on every route but /health")
    slo_ttft: float | None = _opt(None, "time-to-first-token SLO in seconds (default: 2.0 on the CPU engine, "
                                  "1.5 otherwise)")
    slo_tpot: float | None = _opt(None, "time-per-output-token SLO in seconds (default: 0.2 on the CPU engine, "
                                  "0.05 otherwise)")
    max_num_requests: int = _opt(4096, "requests in flight at most; past it the API answers 429")
    request_timeout: float = _opt(600.0, "seconds before an unfinished request ends with an error")
    handoff_timeout: float = _opt(10.0, "seconds a KV handoff may take before its request ends with an error")
    shutdown_grace: float = _opt(5.0, "on SIGINT/SIGTERM, seconds in-flight requests may take to finish before "
                                 "they end with an error")
    monitor: bool = _opt(True, "show the live dashboard when stdout is a terminal")
    log_file: str | None = _opt(None, "write logs here (default: stderr, or dopd.log while the dashboard is on)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("slo_ttft", "slo_tpot", "request_timeout", "handoff_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{flag(name)} must be positive, got {value}")
        if self.max_num_requests < 1:
            raise ValueError("--max-num-requests must be at least 1")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The DOPD controller and the dynamic baselines (dopd, load_threshold, sla)."""

    interval: float = _opt(10.0, "seconds between proactive P/D adjustments (the monitoring interval)",
                           flag="policy-interval")
    forecast_window: int = _opt(50, "intervals the ARIMA forecast looks back over")
    forecast_method: str = _opt("arima", "arima, ewma or last", choices=("arima", "ewma", "last"))
    park_idle: bool = _opt(True, "let the policy park spare workers (role idle) when load is low")
    headroom: float = _opt(1.2, "provision for this multiple of the forecast load")
    emergency_queue: float = _opt(0.5, "act at once when queued prefill work exceeds this share of the TTFT SLO")
    emergency_kv: float = _opt(0.9, "act at once when a decode worker's KV usage exceeds this")
    cooldown_intervals: float = _opt(1.0, "intervals a moved worker's samples stay out of the estimates")
    ultra_short_len: int = _opt(512, "dopd: prompts this short are prefilled on a decode worker with room, without "
                                "a KV transfer (0: never; the paper's code uses 511)")
    short_batch_wait: float = _opt(0.0, "dopd: share of the TTFT SLO a prompt shorter than the forecast mean "
                                   "may wait to be batched with others (0: off; see README, it did not pay here)")

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("--policy-interval must be positive")
        if self.headroom < 1:
            raise ValueError("--headroom must be at least 1")
        if not 0 <= self.short_batch_wait < 1:
            raise ValueError("--short-batch-wait must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class DopdConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per documented field of dataclass `cls` (recursing into nested configs)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_arguments(parser, kind)
            continue
        if "help" not in f.metadata:
            continue
        base = _base_type(kind)
        kwargs: dict = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            kwargs["metavar"] = f.metadata.get("metavar", f.name.split("_")[-1].upper())
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and base is not bool:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument("--" + f.metadata["flag"] if "flag" in f.metadata else flag(f.name), dest=f.name,
                            **kwargs)


def from_args(cls: type, values: dict):
    """Build `cls` from parsed flags; absent flags keep the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = from_args(kind, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _base_type(kind) -> type:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0]
    return kind
