"""Workloads: real trace loaders, transforms and seeded synthetic generators.

A workload is a time-ordered `list[WorkloadRequest]` whose first arrival is at 0 s. Loaders cover
the public traces named in reference/workloads.md (Azure LLM 2023, Mooncake, BurstGPT, ShareGPT);
synthetic workloads use vLLM's Gamma arrival process and length distributions fitted to the
statistics of workloads.md §6, so benchmarks run where no trace file exists. A compact spec string
(`synthetic`) splices phases with different rates and P:D token ratios, to move the controller.

Pure except for reading trace files; no torch.
"""

import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np

from dopd.kv.blocks import blocks_needed

MOONCAKE_BLOCK_SIZE = 512  # tokens per Mooncake `hash_ids` block


class WorkloadRequest(msgspec.Struct):
    """One request to send: when (s from start), how long its prompt is, how many tokens to force."""

    arrival_time: float
    input_len: int
    output_len: int
    prompt: str | None = None
    hash_ids: list[int] | None = None  # Mooncake prefix blocks, for prefix-aware routing


def prefix_block_keys(hash_ids: list[int] | None, input_len: int, index: int, block_size: int) -> list[bytes]:
    """A key for each full `block_size`-token block of the prompt `scripts/bench.py` sends for the
    `index`-th request (`input_len` tokens, Mooncake `hash_ids` or None): equal keys exactly where
    two such prompts hold the same tokens up to and including that block - the same chain of
    Mooncake `hash_ids` (a block's tokens are a function of its id), or nothing shared past them
    (the rest is the request's own). What the simulator's prefix cache looks blocks up by, without
    making the tokens."""
    if MOONCAKE_BLOCK_SIZE % block_size:
        raise ValueError(f"block size {block_size} does not divide Mooncake's {MOONCAKE_BLOCK_SIZE}")
    per = MOONCAKE_BLOCK_SIZE // block_size
    subs = [sub.to_bytes(4, "little") for sub in range(per)]
    ids = hash_ids or []
    keys, chain = [], b""
    num_full = input_len // block_size
    for j in range(blocks_needed(num_full, per)):  # each Mooncake block: its id chained to those before it
        source = f"block {ids[j]}" if j < len(ids) else f"request {index} block {j}"
        chain = hashlib.sha256(chain + source.encode()).digest()
        keys.extend(chain + sub for sub in subs[:min(per, num_full - j * per)])
    return keys


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A mixture of lognormals, rounded and clipped to [1, max_len].

    Each component is (weight, median, sigma); mu = ln(median). Sigma was chosen so the *clipped*
    mean equals the trace mean (the median is unaffected by clipping).
    """

    components: tuple[tuple[float, float, float], ...]
    max_len: int

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        weights = np.array([c[0] for c in self.components])
        which = rng.choice(len(self.components), size=num, p=weights / weights.sum())
        mu = np.log(np.array([c[1] for c in self.components]))[which]
        sigma = np.array([c[2] for c in self.components])[which]
        raw = np.exp(mu + sigma * rng.standard_normal(num))
        return np.clip(np.rint(raw), 1, self.max_len).astype(np.int64)


# Fitted to workloads.md §6 (trace: mean / median / p90 → fitted sample mean / median / p90):
#   azure-code in   2048 / 1469 / 5188  → LN(1469, 0.884) ≤ 7437   2050 / 1472 / 4559 (trace caps at 7437)
#   azure-code out    28 /   13 /   55  → LN(13, 1.239)   ≤ 2000     28 /   13 /   64
#   azure-conv in   1155 / 1020 / 2734  → LN(1020, 0.499) ≤ 16384  1156 / 1021 / 1932 (trace is multimodal)
#   azure-conv out   211 /  129 /  424  → LN(129, 1.071)  ≤ 1000    211 /  129 /  508
#   mooncake in    12035 / 6909 / 27367 → LN(6909, 1.067) ≤ 131072 12052 / 6925 / 27100
#   mooncake out     343 /  350 /  597  → 0.23·LN(28, 1.0) + 0.77·LN(403, 0.43) ≤ 2000   351 / 343 / 656
#                    (mean < median: no single lognormal fits; the trace has a short-answer mode)
#   sharegpt in      219 /  105 /  603  → LN(105, 1.407)  ≤ 1024    219 /  105 /  637 (vLLM-filtered)
#   sharegpt out     201 /  134 /  491  → LN(134, 0.905)  ≤ 2048    201 /  134 /  427
LENGTH_DISTS: dict[str, tuple[LengthDist, LengthDist]] = {
    "azure-code": (LengthDist(((1.0, 1469, 0.884),), 7437), LengthDist(((1.0, 13, 1.239),), 2000)),
    "azure-conv": (LengthDist(((1.0, 1020, 0.499),), 16384), LengthDist(((1.0, 129, 1.071),), 1000)),
    "mooncake": (LengthDist(((1.0, 6909, 1.067),), 131072),
                 LengthDist(((0.23, 28, 1.0), (0.77, 403, 0.43)), 2000)),
    "sharegpt": (LengthDist(((1.0, 105, 1.407),), 1024), LengthDist(((1.0, 134, 0.905),), 2048)),
}


def sample_lengths(spec: str | int, num: int, rng: np.random.Generator, *, output: bool) -> np.ndarray:
    """`num` lengths: a fixed number, or draws from a named input/output distribution."""
    if isinstance(spec, int) or spec.strip().isdigit():
        return np.full(num, int(spec), dtype=np.int64)
    if spec not in LENGTH_DISTS:
        raise ValueError(f"unknown length distribution {spec!r}; known: {', '.join(LENGTH_DISTS)}")
    return LENGTH_DISTS[spec][int(output)].sample(num, rng)


def _relative(times: Sequence[float], input_lens: Sequence[int], output_lens: Sequence[int],
              hash_ids: Sequence[list[int] | None] | None = None) -> list[WorkloadRequest]:
    """Sort by time (stable) and make the first arrival 0 s."""
    order = sorted(range(len(times)), key=times.__getitem__)
    if not order:
        return []
    t0 = times[order[0]]
    return [WorkloadRequest(float(times[i] - t0), int(input_lens[i]), int(output_lens[i]),
                            hash_ids=None if hash_ids is None else hash_ids[i]) for i in order]


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' → seconds since the epoch (naive; 7-digit fractions allowed)."""
    whole, _, frac = stamp.strip().partition(".")
    base = (datetime.fromisoformat(whole) - datetime(1970, 1, 1)).total_seconds()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure(path: str | Path) -> list[WorkloadRequest]:
    """Azure LLM inference trace (2023/2024): TIMESTAMP,ContextTokens,GeneratedTokens."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return _relative([_seconds(r["TIMESTAMP"]) for r in rows], [int(r["ContextTokens"]) for r in rows],
                     [int(r["GeneratedTokens"]) for r in rows])


class _MooncakeRow(msgspec.Struct):
    timestamp: float  # ms
    input_length: int
    output_length: int
    hash_ids: list[int] = []


def load_mooncake(path: str | Path) -> list[WorkloadRequest]:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""
    decoder = msgspec.json.Decoder(_MooncakeRow)
    with open(path, "rb") as f:
        rows = [decoder.decode(line) for line in f if line.strip()]
    return _relative([r.timestamp / 1000.0 for r in rows], [r.input_length for r in rows],
                     [r.output_length for r in rows], [r.hash_ids for r in rows])


def load_burstgpt(path: str | Path, model: str | None = None) -> list[WorkloadRequest]:
    """BurstGPT CSV; keeps rows with a response (> 0 tokens: 0 marks a failure), optionally one Model.

    vLLM's loader uses model="GPT-4"; None keeps every model.
    """
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if int(float(r["Response tokens"])) > 0 and (model is None or r["Model"] == model)]
    return _relative([float(r["Timestamp"]) for r in rows], [int(float(r["Request tokens"])) for r in rows],
                     [int(float(r["Response tokens"])) for r in rows])


def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer: ~4 characters per token, at least one per word."""
    return max(1, len(text.split()), math.ceil(len(text) / 4))


_HUMAN, _BOT = {"human", "user"}, {"gpt", "chatgpt", "assistant", "bard", "bing"}


def load_sharegpt(path: str | Path, rate: float = math.inf, burstiness: float = 1.0, seed: int = 0,
                  count_tokens: Callable[[str], int] = approx_tokens, prune: bool = False,
                  num_requests: int | None = None) -> list[WorkloadRequest]:
    """ShareGPT JSON: first human turn is the prompt, the next gpt turn's length the output.

    ShareGPT has no timestamps, so arrivals come from `arrivals(rate, ...)` (rate=inf: all at 0 s,
    vLLM's default). `prune` applies vLLM's filter: prompt and output ≥ 4, prompt ≤ 1024,
    prompt + output ≤ 2048 tokens.
    """
    with open(path) as f:
        data = json.load(f)
    pairs: list[tuple[str, int, int]] = []
    for item in data:
        turns = item.get("conversations") or []
        first = next((i for i, t in enumerate(turns) if t.get("from") in _HUMAN), None)
        reply = None if first is None else next((t for t in turns[first + 1:] if t.get("from") in _BOT), None)
        if reply is None:
            continue
        prompt = turns[first]["value"]
        num_in, num_out = count_tokens(prompt), count_tokens(reply["value"])
        if prune and (num_in < 4 or num_out < 4 or num_in > 1024 or num_in + num_out > 2048):
            continue
        pairs.append((prompt, num_in, num_out))
        if num_requests is not None and len(pairs) >= num_requests:
            break
    times = arrivals(rate, n=len(pairs), burstiness=burstiness, rng=np.random.default_rng(seed))
    return [WorkloadRequest(float(t), n_in, n_out, prompt=p) for t, (p, n_in, n_out) in zip(times, pairs)]


def load_trace(path: str | Path, **kwargs) -> list[WorkloadRequest]:
    """Pick the loader from the extension and, for CSV, the header; kwargs go to that loader."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_mooncake(path, **kwargs)
    if suffix == ".json":
        return load_sharegpt(path, **kwargs)
    if suffix == ".csv":
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if "ContextTokens" in header:
            return load_azure(path, **kwargs)
        if "Request tokens" in header:
            return load_burstgpt(path, **kwargs)
    raise ValueError(f"cannot tell the trace format of {path}")


def scale_rate(reqs: Sequence[WorkloadRequest], factor: float) -> list[WorkloadRequest]:
    """Multiply the request rate by `factor` (2 = twice as fast) by dividing every arrival time."""
    if factor <= 0:
        raise ValueError("factor must be positive")
    return [msgspec.structs.replace(r, arrival_time=r.arrival_time / factor) for r in reqs]


def clip(reqs: Sequence[WorkloadRequest], max_input_len: int | None = None, max_output_len: int | None = None,
         min_len: int = 1) -> list[WorkloadRequest]:
    """Clamp lengths into [min_len, max_*]; Mooncake hash_ids are cut to the blocks that remain."""
    out = []
    for r in reqs:
        num_in = max(min_len, r.input_len if max_input_len is None else min(r.input_len, max_input_len))
        num_out = max(min_len, r.output_len if max_output_len is None else min(r.output_len, max_output_len))
        hash_ids = None if r.hash_ids is None else r.hash_ids[:math.ceil(num_in / MOONCAKE_BLOCK_SIZE)]
        out.append(msgspec.structs.replace(r, input_len=num_in, output_len=num_out, hash_ids=hash_ids))
    return out


def take(reqs: Sequence[WorkloadRequest], n: int | None = None, duration: float | None = None) -> list[WorkloadRequest]:
    """The first `n` requests, and/or those arriving within `duration` s of the first."""
    out = list(reqs[:n] if n is not None else reqs)
    if duration is not None and out:
        out = [r for r in out if r.arrival_time < out[0].arrival_time + duration]
    return out


def _span(reqs: Sequence[WorkloadRequest]) -> float:
    """Default phase length: the last arrival plus one mean gap, so phases do not collide."""
    if len(reqs) < 2:
        return 0.0
    length = reqs[-1].arrival_time - reqs[0].arrival_time
    return reqs[-1].arrival_time + length / (len(reqs) - 1)


def splice(phases: Sequence[Sequence[WorkloadRequest]], spans: Sequence[float | None] | None = None) -> list[WorkloadRequest]:
    """Concatenate workloads in time: phase k starts when phase k−1's span ends.

    A phase's span defaults to its last arrival plus one mean inter-arrival gap.
    """
    spans = spans if spans is not None else [None] * len(phases)
    out: list[WorkloadRequest] = []
    offset = 0.0
    for phase, span in zip(phases, spans, strict=True):
        out += [msgspec.structs.replace(r, arrival_time=r.arrival_time + offset) for r in phase]
        offset += _span(phase) if span is None else span
    return out


def arrivals(rate: float, n: int | None = None, duration: float | None = None, burstiness: float = 1.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Arrival times (s, first at 0) with vLLM's Gamma process: gap ~ Gamma(b, 1/(rate·b)).

    b = 1 is Poisson, b < 1 burstier (gap CV = 1/sqrt(b)), b = inf evenly spaced. Give exactly one
    of `n` (the gaps are rescaled so the n gaps sum to n/rate, as vLLM does) or `duration`.
    """
    if (n is None) == (duration is None):
        raise ValueError("give exactly one of n and duration")
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = rng if rng is not None else np.random.default_rng()
    if math.isinf(rate):  # vLLM's default: everything at once
        if n is None:
            raise ValueError("an infinite rate needs n")
        return np.zeros(n)

    def gaps(num: int) -> np.ndarray:
        if math.isinf(burstiness):
            return np.full(num, 1.0 / rate)
        return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)

    if n is not None:
        g = gaps(n) if n else np.ones(1)
        g *= (n / rate) / g.sum()
        return np.concatenate(([0.0], np.cumsum(g[:-1])))[:n]
    chunks, t = [np.zeros(1)], 0.0
    while t < duration:
        cum = t + np.cumsum(gaps(int(rate * duration) + 16))
        chunks.append(cum)
        t = float(cum[-1])
    times = np.concatenate(chunks)
    return times[times < duration]


_KEYS = {"rate", "n", "duration", "burstiness", "cv", "in", "out", "max_in", "max_out", "path", "scale", "start"}


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'kind:k=v,k=v;kind:...' → [(kind, {k: v})]; unknown keys are an error, not a silent typo."""
    phases = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, body = part.partition(":")
        items = [item.partition("=") for item in filter(None, (s.strip() for s in body.split(",")))]
        if any(not sep for _, sep, _ in items):
            raise ValueError(f"expected key=value items in phase {part!r}")
        opts = {key.strip(): value.strip() for key, _, value in items}
        if unknown := set(opts) - _KEYS:
            raise ValueError(f"unknown keys {sorted(unknown)} in phase {part!r}")
        phases.append((kind.strip(), opts))
    if not phases:
        raise ValueError("empty workload spec")
    return phases


def _phase(kind: str, opts: dict[str, str], rng: np.random.Generator) -> tuple[list[WorkloadRequest], float | None]:
    """One phase's requests and its span (None: default span)."""
    n = int(opts["n"]) if "n" in opts else None
    duration = float(opts["duration"]) if "duration" in opts else None
    if kind == "trace":
        path = opts["path"]
        if Path(path).suffix.lower() == ".json":  # ShareGPT: no timestamps, arrivals are synthetic
            reqs = load_sharegpt(path, rate=float(opts.get("rate", "inf")), seed=int(rng.integers(2**31)),
                                 burstiness=float(opts.get("burstiness", 1.0)))
        else:
            start = float(opts.get("start", 0.0))  # trace seconds: where the window begins
            reqs = [msgspec.structs.replace(r, arrival_time=r.arrival_time - start)
                    for r in load_trace(path) if r.arrival_time >= start]
            reqs = scale_rate(reqs, float(opts.get("scale", 1.0)))
        if duration is not None:
            reqs = [r for r in reqs if r.arrival_time < duration]
        return reqs[:n], duration
    burstiness = {"poisson": 1.0, "constant": math.inf}.get(kind)
    if kind == "gamma":
        burstiness = float(opts["cv"]) ** -2 if "cv" in opts else float(opts["burstiness"])
    if burstiness is None:
        raise ValueError(f"unknown phase kind {kind!r}: poisson, gamma, constant or trace")
    rate = float(opts["rate"])
    times = arrivals(rate, n=n, duration=duration, burstiness=burstiness, rng=rng)
    num_in = sample_lengths(opts["in"], len(times), rng, output=False)
    num_out = sample_lengths(opts["out"], len(times), rng, output=True)
    reqs = [WorkloadRequest(float(t), int(i), int(o)) for t, i, o in zip(times, num_in, num_out)]
    return reqs, duration if duration is not None else len(times) / rate


def synthetic(spec: str, seed: int = 0) -> list[WorkloadRequest]:
    """Build a workload from a spec; same spec + seed → the same workload.

    Phases are separated by ';' and spliced in time. Kinds and keys:
      poisson:rate=4,n=1000,in=azure-conv,out=azure-conv
      gamma:rate=4,burstiness=0.25,duration=300,in=1000,out=200   (or cv=2 for burstiness=1/cv²)
      constant:rate=2,n=50,in=512,out=64
      trace:path=conv.csv,scale=2,start=600,duration=120           (a .json path is ShareGPT: rate=,burstiness=)
    in/out: a fixed token count or one of LENGTH_DISTS; n or duration ends a phase; max_in/max_out
    clamp lengths in any phase. Each phase draws from its own stream (seed, phase index), so
    editing one phase leaves the others unchanged.
    """
    phases, spans = [], []
    for index, (kind, opts) in enumerate(parse_spec(spec)):
        try:
            reqs, span = _phase(kind, opts, np.random.default_rng([seed, index]))
        except KeyError as missing:
            raise ValueError(f"phase {index} ({kind}) needs the key {missing}") from None
        if "max_in" in opts or "max_out" in opts:
            reqs = clip(reqs, int(opts["max_in"]) if "max_in" in opts else None,
                        int(opts["max_out"]) if "max_out" in opts else None)
        phases.append(reqs)
        spans.append(span)
    return splice(phases, spans)


def shape(reqs: list[WorkloadRequest], rate_scale: float = 1.0, num_requests: int | None = None,
          duration: float | None = None, max_input_len: int | None = None,
          max_output_len: int | None = None) -> list[WorkloadRequest]:
    """The transforms every script offers, in one order: rescale the rate, cut, clip the lengths."""
    if rate_scale != 1.0:
        reqs = scale_rate(reqs, rate_scale)
    reqs = take(reqs, num_requests, duration)
    if max_input_len or max_output_len:
        reqs = clip(reqs, max_input_len, max_output_len)
    return reqs


def describe(reqs: Sequence[WorkloadRequest]) -> dict[str, float | int]:
    """Count, span, mean rate (n / (last − first arrival)) and length percentiles, as in workloads.md."""
    summary: dict[str, float | int] = {"num_requests": len(reqs)}
    duration = reqs[-1].arrival_time - reqs[0].arrival_time if reqs else 0.0
    summary |= {"duration_s": duration, "rate_rps": len(reqs) / duration if duration > 0 else 0.0}
    for name, values in (("input", [r.input_len for r in reqs]), ("output", [r.output_len for r in reqs])):
        arr = np.asarray(values, dtype=float)
        stats = (arr.mean(), *np.percentile(arr, (50, 90, 99))) if arr.size else (0.0,) * 4
        summary |= dict(zip((f"{name}_mean", f"{name}_median", f"{name}_p90", f"{name}_p99"), map(float, stats)))
    total_out = sum(r.output_len for r in reqs)
    summary["in_out_ratio"] = sum(r.input_len for r in reqs) / total_out if total_out else 0.0
    return summary
