"""The Llama family (Llama 2/3, Mistral, Qwen2) as our own modules over a packed token batch.

A step's tokens from every sequence are packed into one `[num_tokens, hidden]` tensor (no padding);
only attention needs to know where sequences begin and end, and it asks the attention backend,
which was prepared once for the step. q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dopd.workers.cpu_kernels import LayerOps
from dopd.workers.fused_decode import FusedDecode
from dopd.workers.gguf import MAX_ROWS as MAX_BLOCK_ROWS
from dopd.workers.gguf import PackedWeight

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, config) -> "ModelArch":
        """Read a transformers config; an unsupported one gets an error that names what is supported."""
        archs = list(getattr(config, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            found = ", ".join(archs) or getattr(config, "model_type", "unknown")
            raise ValueError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}; the Llama family uses silu")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        num_heads = config.num_attention_heads
        sliding = getattr(config, "sliding_window", None)
        if arch == "Qwen2ForCausalLM" and not getattr(config, "use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=sliding,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim  # times the element size


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies as transformers computes them (same float32 ops, so the same bits)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for every position, computed once; a step gathers its tokens' rows."""

    def __init__(self, arch: ModelArch, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(arch))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """nn.Linear that, on CPU, also keeps a oneDNN-prepacked copy of its weight, and its GGUF blocks.

    From a few rows up (batched decode, prefill) the packed GEMM streams the weights faster than
    the default one; for one or two rows the plain GEMV is faster. Where the checkpoint came as GGUF,
    steps of up to gguf.MAX_ROWS tokens multiply by its blocks instead (a quarter of the bytes or
    less, the same float32 matrix). Results agree to ~1e-6 (float32). Where blocks and the packed copy
    serve every row count between them, the loader frees the plain weight (it is then None).
    """

    packed: torch.Tensor | None = None
    blocks: PackedWeight | None = None
    MIN_PACKED_ROWS = 4
    MIN_PACKED_WEIGHTS = 2**18  # below this the oneDNN call costs more than it saves

    def pack(self, batch_hint: int = 16) -> None:
        if self.weight.numel() >= self.MIN_PACKED_WEIGHTS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def weight_unused(self) -> bool:
        """Whether forward never reads the plain weight: the blocks take up to MAX_BLOCK_ROWS rows and the
        packed copy every count above."""
        return self.blocks is not None and self.packed is not None and self.MIN_PACKED_ROWS <= MAX_BLOCK_ROWS + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and x.shape[0] <= MAX_BLOCK_ROWS:
            out = self.blocks.matmul(x)
            return out if self.bias is None else out + self.bias
        if self.packed is not None and x.shape[0] >= self.MIN_PACKED_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack weights of `dtype` on this CPU: its fp16 path needs AVX512-FP16 or
    AVX-NE-CONVERT (an AMD Zen 5 has neither, and the reorder raises); F.linear serves fp16 there."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True


class RMSNorm(nn.Module):
    ops: LayerOps | None = None  # our fused CPU kernels, where they run (CausalLM.use_cpu_kernels)

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def add_and_norm(self, x: torch.Tensor, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + add, norm(x + add)): the residual stream and this norm of it, in one pass."""
        if self.ops is not None:
            return self.ops.add_rms_norm(x, add, self.weight, self.eps)
        x = x + add
        return x, self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.add_rms_norm(x, None, self.weight, self.eps)[1]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    ops: LayerOps | None = None

    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        num_tokens = qkv.shape[0]
        # q and k share the rotation: one call over their heads side by side.
        if self.ops is not None:
            self.ops.rotary_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos, sin)
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
        else:
            qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attn.forward(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    ops: LayerOps | None = None

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self.mlp(h)


class CausalLM(nn.Module):
    fused_decode: FusedDecode | None = None  # decode steps' layers one C++ call each (use_fused_decode)

    def __init__(self, arch: ModelArch, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rotary = Rotary(arch, max_positions, dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """Hidden states `[num_tokens, hidden]` after the final norm."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.tables(positions)
        if self.fused_decode is not None and self.fused_decode.serves(attn, x.shape[0]):
            self.fused_decode.run(x, cos, sin, attn)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, attn)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # A tied head is the embedding itself; only CPU prepacking (pack_for_cpu) gives it a module.
        logits = F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def use_cpu_kernels(self, ops: LayerOps) -> None:
        """Norms, rotary and SiLU-and-mul through our fused kernels (CPU, float32)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.ops = ops

    def use_fused_decode(self) -> None:
        """Where every projection has GGUF blocks (after use_cpu_kernels): decode layers in one call each."""
        if FusedDecode.supports(self):
            self.fused_decode = FusedDecode(self)

    def pack_for_cpu(self) -> None:
        """Prepack every projection for oneDNN (CPU); a tied LM head gets a packed copy of the embedding."""
        if self.lm_head is None:
            self.lm_head = Linear(self.arch.hidden_size, self.arch.vocab_size, bias=False, device="cpu",
                                  dtype=self.embed_tokens.weight.dtype)
            self.lm_head.weight = self.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
