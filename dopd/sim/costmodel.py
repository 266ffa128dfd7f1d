"""Analytic cost model of one worker's engine step (DistServe's form), with roofline presets and fitting.

The mock engine sleeps for `step_time`, the simulator advances its virtual clock by it, and the P/D
ratio policy reads TTFT(ISL), TPOT(concurrency, context), KV capacity and bandwidth from it.

The form is DistServe's `simdistserve` estimator (peers.md §2.8), one regime for decode:

    prefill  t = a_p + b_p·Σl + c_p·Σl²            floored at a_d: a step streams the weights at least once
    decode   t = a_d + b_d·Σcontext + c_d·batch_size
    mixed    t = max(a_p + b_p·Σl + c_p·Σwork, a_d) + b_d·Σcontext + c_d·batch_size

A chunk of n new tokens over c cached ones does attention work n·(2c+n) in place of l² (c=0 gives l²).
`roofline` derives the coefficients from FLOPs and bytes (the comments there derive each term), with
the same achieved fractions of peak for every preset. They are set so that OPT-13B on one A100 lands
near DistServe's published A100 profile (`profiler-a100-80g.distserve.json`: 1k-token prefill 116 ms,
32 × 1k-context decode 41 ms); see tests/test_costmodel.py. `fit` re-derives the six coefficients from
measured steps (real engine, CPU), which is what a saved profile file holds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Achieved fractions of peak, one set for all presets. Large prefill GEMMs reach 0.7-0.8 of peak on
# A100 and 0.6-0.7 on H100 (bf16 and fp8); attention kernels ~0.5 (FlashAttention-2 figures); decode
# streams weights and paged KV at 0.75-0.85 of HBM bandwidth.
MATMUL_FLOPS_FRACTION = 0.65
ATTN_FLOPS_FRACTION = 0.5
MEM_BW_FRACTION = 0.8
STEP_OVERHEAD_S = 3e-3  # scheduling, python, kernel launches per engine step
SAMPLE_OVERHEAD_S = 10e-6  # per sequence per step: sampling, detokenising, bookkeeping
ALLREDUCE_LATENCY_S = 10e-6  # per tensor-parallel all-reduce; two per layer
MEM_UTIL = 0.9  # share of HBM the engine may use (vLLM gpu_memory_utilization)
ACTIVATION_RESERVE_BYTES = 2 * 2**30  # per GPU: activations, CUDA graphs, NCCL buffers
MAX_WEIGHT_FRACTION = 0.6  # default tp: smallest with weights ≤ this share of usable memory
LINK_LATENCY_S = 30e-6  # fixed cost of one KV transfer (setup, completion notification)
PCIE_BW = 50e9  # PCIe gen5 x16, achieved
ACT_BYTES = 2  # bf16 activations in all-reduces


@dataclass(frozen=True)
class Hardware:
    """One accelerator. mem_bytes is nvidia-smi's total (marketing "80 GB" is ~80 GiB)."""

    name: str
    bf16_flops: float
    fp8_flops: float | None  # None: no fp8 tensor cores, fp8 weights run at the bf16 rate
    mem_bw: float  # HBM B/s
    mem_bytes: int
    link_bw: float  # default intra-node link (NVLink), B/s per direction

    def matmul_flops(self, weight_dtype_bytes: float) -> float:
        return self.fp8_flops if weight_dtype_bytes <= 1 and self.fp8_flops else self.bf16_flops


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 1979e12, 3.35e12, 81559 * 2**20, 450e9),
    "h200": Hardware("h200", 989e12, 1979e12, 4.8e12, 143771 * 2**20, 450e9),
    "a100": Hardware("a100", 312e12, None, 2.039e12, 81920 * 2**20, 300e9),
}
HARDWARE_NAMES: tuple[str, ...] = tuple(HARDWARE)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape. Norms, biases and positional tables (<0.2 %) are ignored."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool  # Llama: gate/up/down (3 matmuls h×i); OPT: fc1/fc2 (2 matmuls h×4h)
    tied_embeddings: bool  # OPT reuses the embedding as the LM head; Llama-3 has its own
    weight_dtype_bytes: float = 2.0
    kv_dtype_bytes: int = 2

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return 2 * h * q + 2 * h * kv + mlp  # q and o; k and v; MLP

    @property
    def matmul_params(self) -> int:
        """Weights a decode step multiplies with: every layer plus the LM head (lookups cost nothing)."""
        return self.num_layers * self.layer_params + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.matmul_params + (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes


def _llama3(name: str, layers: int, hidden: int, inter: int, heads: int, wbytes: float) -> ModelShape:
    return ModelShape(name, layers, hidden, inter, heads, 8, 128, 128256, True, False, wbytes, 2)


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, hidden, 4 * hidden, heads, heads, hidden // heads, 50272, False, True)


MODELS: dict[str, ModelShape] = {  # published configs (HF config.json)
    "llama3-8b": _llama3("llama3-8b", 32, 4096, 14336, 32, 2.0),
    "llama3-70b": _llama3("llama3-70b", 80, 8192, 28672, 64, 2.0),
    "llama3-70b-fp8": _llama3("llama3-70b-fp8", 80, 8192, 28672, 64, 1.0),
    "opt-13b": _opt("opt-13b", 40, 5120, 40),
    "opt-30b": _opt("opt-30b", 48, 7168, 56),
}
PROFILE_NAMES: tuple[str, ...] = tuple(MODELS)


@dataclass(frozen=True)
class Link:
    """A KV-transfer path: t = latency_s + bytes / bandwidth (the pair's bottleneck, B/s)."""

    name: str
    bandwidth: float
    latency_s: float = LINK_LATENCY_S

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth if num_bytes > 0 else 0.0


def get_link(spec: str | float, hardware: Hardware | str = "h100") -> Link:
    """`nvlink` (the hardware's), `pcie`, or a number of GB/s ("25" → 25e9 B/s)."""
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    if spec in ("nvlink", "pcie"):
        return Link(spec, hw.link_bw if spec == "nvlink" else PCIE_BW)
    try:
        gbps = float(spec)
    except ValueError:
        raise ValueError(f"unknown link {spec!r}: use 'nvlink', 'pcie' or a bandwidth in GB/s") from None
    if gbps <= 0:
        raise ValueError(f"link bandwidth must be positive, got {spec!r} GB/s")
    return Link(f"{gbps:g}GB/s", gbps * 1e9)


def attn_work(num_new_tokens: int, num_cached_tokens: int = 0) -> int:
    """Attention work of a chunk, in units where a fresh prompt of l tokens costs l²."""
    return num_new_tokens * (2 * num_cached_tokens + num_new_tokens)


COEFS = ("prefill_a", "prefill_b", "prefill_c", "decode_a", "decode_b", "decode_c", "small_decode_a",
         "small_decode_c")


@dataclass(frozen=True)
class CostModel:
    """One worker's step-time coefficients (seconds) and memory facts: what a profile file holds."""

    name: str
    prefill_a: float  # s per step
    prefill_b: float  # s per new token
    prefill_c: float  # s per unit of attention work (l² for a fresh prompt)
    decode_a: float  # s per step
    decode_b: float  # s per token of context
    decode_c: float  # s per sequence
    # A pure decode step of fewer than `small_batch_rows` sequences runs other matmul kernels (on CPU
    # our engine's GEMV below Linear.MIN_PACKED_ROWS rows, faster there than the packed GEMM, with a
    # jump at the switch no single line follows): its own constant and per-sequence cost, the same
    # per-context-token one. 0: one regime (the GPU presets).
    small_batch_rows: int = 0
    small_decode_a: float = 0.0
    small_decode_c: float = 0.0
    kv_bytes_per_token: int = 0
    kv_capacity_tokens: int = 0  # per worker (all its GPUs)
    weight_bytes: int = 0
    mem_bw: float = 0.0  # achievable HBM B/s of the worker
    num_gpus: int = 1  # tensor-parallel degree
    hardware: str = ""
    link: Link = Link("nvlink", 450e9)

    def step_time(
        self, num_prefill_tokens: int = 0, prefill_attn_work: int = 0, num_decodes: int = 0, sum_decode_context: int = 0
    ) -> float:
        """One engine step over prefill chunks and decodes (a mixed step when both are present).

        t = max(a_p + b_p·n + c_p·w, a_d) + b_d·ctx + c_d·bs. The decodes' per-token and per-sequence
        work adds to the prefill's; their constant (streaming the weights) overlaps the prefill's matmuls,
        so a mixed step pays the larger of the two constants, not both. With no decodes this is the
        floored prefill form, with no prefill exactly the decode form.
        """
        if num_decodes and not num_prefill_tokens and num_decodes < self.small_batch_rows:
            return self.small_decode_a + self.decode_b * sum_decode_context + self.small_decode_c * num_decodes
        decode = self.decode_b * sum_decode_context + self.decode_c * num_decodes if num_decodes else 0.0
        if num_prefill_tokens > 0:
            prefill = self.prefill_a + self.prefill_b * num_prefill_tokens + self.prefill_c * prefill_attn_work
            return max(prefill, self.decode_a) + decode
        return self.decode_a + decode if num_decodes else 0.0

    def prefill_time(self, lengths: list[int], num_cached: list[int] | None = None) -> float:
        """A prefill batch of prompts (or chunks of `lengths` new tokens over `num_cached` cached ones)."""
        cached = num_cached or [0] * len(lengths)
        return self.step_time(sum(lengths), sum(attn_work(n, c) for n, c in zip(lengths, cached)))

    def decode_time(self, batch_size: int, sum_context: int) -> float:
        return self.step_time(num_decodes=batch_size, sum_decode_context=sum_context)

    def kv_transfer_time(self, num_tokens: int, link: Link | None = None) -> float:
        return (link or self.link).transfer_time(num_tokens * self.kv_bytes_per_token)

    def scaled(self, prefill: float = 1.0, decode: float = 1.0) -> CostModel:
        """Times multiplied by measured/predicted correction factors (the paper's p_corr, d_corr)."""
        return dataclasses.replace(self, **{k: getattr(self, k) * (prefill if k.startswith("prefill") else decode)
                                            for k in COEFS})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        try:
            return cls(**{**data, "link": Link(**data["link"])} if "link" in data else data)
        except TypeError as e:
            raise ValueError(f"{path}: not a cost-model profile ({e})") from None


def default_tp(hardware: Hardware, model: ModelShape) -> int:
    """Smallest power-of-two tp whose usable memory keeps the weights under MAX_WEIGHT_FRACTION."""
    tp = 1
    while model.num_params * model.weight_dtype_bytes > MAX_WEIGHT_FRACTION * tp * hardware.mem_bytes * MEM_UTIL:
        tp *= 2
    return tp


def roofline(
    hardware: Hardware | str, model: ModelShape | str, tp: int = 1, mem_util: float = MEM_UTIL, link: Link | None = None
) -> CostModel:
    """Derive a worker's coefficients from FLOPs and bytes at the achieved fractions of peak above."""
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    m = MODELS[model] if isinstance(model, str) else model
    matmul_rate = tp * hw.matmul_flops(m.weight_dtype_bytes) * MATMUL_FLOPS_FRACTION
    attn_rate = tp * hw.bf16_flops * ATTN_FLOPS_FRACTION  # KV stays bf16, so attention runs at bf16 rate
    mem_bw = tp * hw.mem_bw * MEM_BW_FRACTION
    # Tensor parallelism all-reduces the hidden state twice per layer (after attention, after the MLP):
    # a latency per call and, for a ring, 2(tp-1)/tp of the activation bytes over the link per token.
    comm_s = 2 * m.num_layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0
    comm_per_token = 2 * m.num_layers * m.hidden_size * ACT_BYTES * 2 * (tp - 1) / tp / hw.link_bw
    # Prefill. Each layer weight is multiplied once per token: 2 FLOPs per weight per token (the LM
    # head runs on one token per prompt, so it is left out). Attention: query i attends keys j ≤ i;
    # per pair and layer QKᵀ and PV cost 2·q_dim each, so 4·L·q_dim; causality halves the l² pairs,
    # leaving 2·L·q_dim·l² (the n·(2c+n) work of a chunk has the same factor).
    q_dim = m.num_heads * m.head_dim
    prefill_b = 2 * m.num_layers * m.layer_params / matmul_rate + comm_per_token
    prefill_c = 2 * m.num_layers * q_dim / attn_rate
    # Decode is memory-bound: each step streams every matmul weight once (the constant), plus each
    # sequence's KV (per context token). Each sequence adds one token's matmul FLOPs and sampling;
    # adding them rather than overlapping matches DistServe's large-batch fit (~160 µs/seq, OPT-13B).
    streamed = m.matmul_params * m.weight_dtype_bytes
    kv_shards = min(tp, m.num_kv_heads)  # with more GPUs than KV heads, heads are replicated
    kv_worker_bytes = m.kv_bytes_per_token * tp / kv_shards
    decode_a = streamed / mem_bw + STEP_OVERHEAD_S + comm_s
    decode_b = kv_worker_bytes / mem_bw
    decode_c = 2 * m.matmul_params / matmul_rate + comm_per_token + SAMPLE_OVERHEAD_S
    weight_bytes = int(m.num_params * m.weight_dtype_bytes)
    free = tp * (hw.mem_bytes * mem_util - ACTIVATION_RESERVE_BYTES) - weight_bytes
    if free <= 0:
        raise ValueError(f"{m.name} ({weight_bytes / 1e9:.0f} GB) leaves no KV room on {tp}×{hw.name}; raise tp")
    return CostModel(
        name=f"{m.name}@{hw.name}-tp{tp}", prefill_a=STEP_OVERHEAD_S + comm_s, prefill_b=prefill_b,
        prefill_c=prefill_c, decode_a=decode_a, decode_b=decode_b, decode_c=decode_c,
        kv_bytes_per_token=m.kv_bytes_per_token, kv_capacity_tokens=int(free // kv_worker_bytes),
        weight_bytes=weight_bytes, mem_bw=mem_bw, num_gpus=tp, hardware=hw.name, link=link or get_link("nvlink", hw),
    )  # fmt: skip


def get_profile(name_or_path: str, hardware: str = "h100", tp: int | None = None) -> CostModel:
    """A saved profile (JSON file) or a model preset on a hardware preset through `roofline`."""
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        model = CostModel.load(name_or_path)
        if tp is not None and tp != model.num_gpus:
            raise ValueError(f"{name_or_path} was profiled at tp={model.num_gpus}, not tp={tp}")
        return model
    if name_or_path not in MODELS:
        raise ValueError(f"unknown profile {name_or_path!r}: use a JSON file or one of {', '.join(PROFILE_NAMES)}")
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}: use one of {', '.join(HARDWARE_NAMES)}")
    hw, m = HARDWARE[hardware], MODELS[name_or_path]
    return roofline(hw, m, tp or default_tp(hw, m))


# A measured step: ("prefill", [l, ...] or [(new, cached), ...], s) or ("decode", (batch_size, sum_context), s).
Shape = list[int] | list[tuple[int, int]] | tuple[int, int]
Sample = tuple[str, Shape, float]


def _features(kind: str, shape: Shape) -> tuple[float, float, float]:
    if kind == "decode":
        batch_size, sum_context = shape  # type: ignore[misc]
        return 1.0, float(sum_context), float(batch_size)
    if kind == "prefill":
        chunks = [(x, 0) if isinstance(x, int) else tuple(x) for x in shape]  # type: ignore[union-attr]
        return 1.0, float(sum(n for n, _ in chunks)), float(sum(attn_work(n, c) for n, c in chunks))
    raise ValueError(f"unknown sample kind {kind!r}: use 'prefill' or 'decode'")


def predict(model: CostModel, kind: str, shape: Shape) -> float:
    _, x1, x2 = (int(x) for x in _features(kind, shape))
    return model.step_time(num_decodes=x2, sum_decode_context=x1) if kind == "decode" else model.step_time(x1, x2)


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: the best unconstrained fit over every support set.

    The NNLS optimum is the plain least-squares solution on its own support, so trying all 2^k
    supports (k=3 here: 8 solves) and keeping the best feasible one is exact. Rows are weighted by
    1/y so that the fit minimises relative error: a 2 s prefill must not drown a 20 ms one.
    """
    x, y = x / y[:, None], np.ones_like(y)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300)  # columns span 1 to ~1e8: normalise first
    xs, k = x / scale, x.shape[1]
    best, best_err = np.zeros(k), float(np.sum(y**2))
    for mask in range(1, 2**k):
        cols = [j for j in range(k) if mask >> j & 1]
        coef = np.linalg.lstsq(xs[:, cols], y, rcond=None)[0]
        if np.all(coef >= 0):
            err = float(np.sum((xs[:, cols] @ coef - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(k), err
                best[cols] = coef
    return best / scale


def fit(samples: list[Sample], base: CostModel | None = None, name: str = "fitted",
        small_batch_rows: int = 0) -> CostModel:
    """Fit the step-time coefficients (≥ 0) to measured steps; memory facts come from `base`.

    Decode is fitted first: batches of `small_batch_rows` and more in DistServe's form; smaller ones,
    if `small_batch_rows` is set, get their own constant and per-sequence cost with the per-context
    cost of the others. Prefill steps that sit on the weight-streaming floor (within 10 % of the
    fitted a_d) carry no information about a_p, b_p, c_p and are left out. A kind with no samples
    keeps `base`'s coefficients (zeros without one).
    """
    if any(t <= 0 for _, _, t in samples):
        raise ValueError("measured step times must be positive")
    ref = base or CostModel(name, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    rows = {kind: [(_features(k, shape), t) for k, shape, t in samples if k == kind] for kind in ("prefill", "decode")}
    small = [r for r in rows["decode"] if r[0][2] < small_batch_rows]
    large = [r for r in rows["decode"] if r[0][2] >= small_batch_rows]
    da, db, dc = ref.decode_a, ref.decode_b, ref.decode_c
    if large:
        da, db, dc = nnls(np.array([f for f, _ in large]), np.array([t for _, t in large]))
    sa, sc = ref.small_decode_a, ref.small_decode_c
    if small:
        rest = np.array([t - db * f[1] for f, t in small])  # what is left for a_s + c_s·bs
        sa, sc = nnls(np.array([[1.0, f[2]] for f, _ in small]), np.maximum(rest, 1e-9))
    pa, pb, pc = ref.prefill_a, ref.prefill_b, ref.prefill_c
    above = [r for r in rows["prefill"] if r[1] > 1.1 * da]
    if prefill_rows := above if len(above) >= 3 else rows["prefill"]:
        pa, pb, pc = nnls(np.array([f for f, _ in prefill_rows]), np.array([t for _, t in prefill_rows]))
    coefs = dict(zip(COEFS, (pa, pb, pc, da, db, dc, sa, sc)))
    return dataclasses.replace(ref, name=name, small_batch_rows=small_batch_rows if small else 0,
                               **{k: float(v) for k, v in coefs.items()})


def relative_errors(model: CostModel, samples: list[Sample]) -> list[float]:
    """(predicted − measured) / measured for each sample: a profile's error on held-out steps."""
    return [(predict(model, kind, shape) - t) / t for kind, shape, t in samples]


def main() -> None:
    rows = [("llama3-8b", "h100", None), ("llama3-70b-fp8", "h100", 1), ("llama3-70b-fp8", "h100", None),
            ("llama3-70b-fp8", "h200", None), ("llama3-70b", "h100", None), ("opt-13b", "a100", None),
            ("opt-30b", "a100", None)]  # fmt: skip
    print(f"{'profile':28} prefill 1k prefill 4k  dec 64x1k  KV tokens blocks/128  xfer 1k")
    for name, hw, tp in rows:
        cm = get_profile(name, hw, tp)
        print(f"{cm.name:28} {cm.prefill_time([1000]) * 1e3:8.1f}ms {cm.prefill_time([4000]) * 1e3:8.1f}ms "
              f"{cm.decode_time(64, 64_000) * 1e3:8.1f}ms {cm.kv_capacity_tokens:10d} "
              f"{cm.kv_capacity_tokens // 128:10d} {cm.kv_transfer_time(1000) * 1e3:6.2f}ms")  # fmt: skip


if __name__ == "__main__":
    main()
