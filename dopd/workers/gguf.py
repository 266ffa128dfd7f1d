"""GGUF block weights kept packed on CPU, and the kernel that multiplies by them.

The embedded SmolLM2 ships as GGUF: its projections in Q4_1 (32 weights share a float16 scale d
and minimum m, each weight a 4-bit q: w = d*q + m), its embedding, which is also the tied LM head,
in Q8_0 (w = d*q, q an int8). transformers dequantises them to float32 and so do we, but a decode
step over float32 weights reads 537 MB and is bound by memory bandwidth. Kept as blocks, the same
weights are 0.75 (Q4_1) or 1.125 (Q8_0) bytes each, and `csrc/gguf_matmul.cpp` (built by
cpu_kernels.py) dequantises them in registers exactly as gguf-py does, so the matrix it multiplies
by is bit for bit the float32 one.

The blocks are stored beside the checkpoint (`gguf/blocks.safetensors`, written when the embedded
model is converted, in the checkpoint's row order) and packed at load into the kernel's panel
layout. They serve steps of up to `MAX_ROWS` tokens (decode); longer steps are compute-bound and
go through oneDNN with the float32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dopd.workers.cpu_kernels import library

BLOCK = 32  # weights per GGUF block, along the input dimension
PANEL = 16  # output rows per panel of the kernel's layout
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # float16 d (and m), then the codes
BLOCKS_FILE = "gguf/blocks.safetensors"
MAX_ROWS = 64  # measured on SmolLM2: ~1.9x oneDNN at 16 rows, ~1.3x at 32, even at 64-128

# GGUF tensor name -> Hugging Face name (llama.cpp's convention for the Llama family).
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True, slots=True)
class Blocks:
    """One weight matrix in GGUF blocks, unpacked: q [N, K] codes, d and m [N, K/32] float32."""

    kind: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @classmethod
    def parse(cls, kind: str, raw: torch.Tensor) -> "Blocks":
        """From GGUF's bytes, [N, K/32 * block bytes] uint8."""
        if kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported GGUF block type {kind!r}; supported: {', '.join(BLOCK_BYTES)}")
        rows = raw.shape[0]
        blocks = raw.reshape(rows, -1, BLOCK_BYTES[kind])
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        if kind == "q8_0":
            return cls(kind, blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d, None)
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        codes = blocks[..., 4:]  # element j of a block is byte j's low nibble, j + 16 its high one
        return cls(kind, torch.cat((codes & 0x0F, codes >> 4), dim=-1).reshape(rows, -1), d, m)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], as gguf-py computes it (d*q is exact, so the one rounding is the same)."""
        rows, cols = self.q.shape
        w = self.q.float().view(rows, -1, BLOCK) * self.d.unsqueeze(-1)
        if self.m is not None:
            w = w + self.m.unsqueeze(-1)
        return w.view(rows, cols)

    @staticmethod
    def cat(parts: list["Blocks"]) -> "Blocks":
        """Row-wise concatenation, for our fused projections (qkv, gate_up)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse GGUF blocks of different types: {sorted(kinds)}")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return Blocks(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)


class PackedWeight:
    """`Blocks` in the kernel's layout: panels of 16 rows, the 16 codes for one k side by side."""

    def __init__(self, blocks: Blocks) -> None:
        rows, cols = blocks.q.shape
        if rows % PANEL or cols % BLOCK:
            raise ValueError(f"a {rows}x{cols} weight does not tile into {PANEL}-row panels of {BLOCK}-wide blocks")
        self.kind, self.rows, self.cols = blocks.kind, rows, cols
        panels = _panels(blocks.q)
        if blocks.kind == "q4_1":  # k in the low nibble, k+1 in the high one
            self.codes = (panels[:, 0::2] | (panels[:, 1::2] << 4)).contiguous()
        else:
            self.codes = panels
        self.scale = _panels(blocks.d)
        self.min = None if blocks.m is None else _panels(blocks.m)
        self._kernel = library()
        if self._kernel is None:
            raise RuntimeError("the GGUF kernel is not available on this machine")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 @ W.T -> [M, N]."""
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.rows, dtype=torch.float32)
        if self.kind == "q4_1":
            self._kernel.dopd_q4_1_matmul(x.data_ptr(), x.shape[0], self.cols, self.rows, self.codes.data_ptr(),
                                          self.scale.data_ptr(), self.min.data_ptr(), out.data_ptr())
        else:
            self._kernel.dopd_q8_0_matmul(x.data_ptr(), x.shape[0], self.cols, self.rows, self.codes.data_ptr(),
                                          self.scale.data_ptr(), out.data_ptr())
        return out


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[N, X] -> [N/16, X, 16]: for every column, the 16 rows of a panel side by side."""
    return t.reshape(t.shape[0] // PANEL, PANEL, -1).transpose(1, 2).contiguous()


def extract_blocks(gguf_file: Path, hf_weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The GGUF file's block tensors under their Hugging Face names, rows in the checkpoint's order.

    llama.cpp permutes the rows of q and k for its rotary layout and transformers permutes them back;
    rather than repeat that arithmetic, each matrix's rows are matched to the dequantised float32
    checkpoint exactly, which also proves the blocks are the same weights.
    """
    from gguf import GGUFReader

    tensors, kinds = {}, {}
    for tensor in GGUFReader(gguf_file).tensors:
        kind = tensor.tensor_type.name.lower()
        if kind not in BLOCK_BYTES:
            continue  # norms stay float32 in the checkpoint
        parts = tensor.name.split(".")
        hf = f"{GGUF_TO_HF[parts[0]]}.weight" if parts[0] == "token_embd" else \
            f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"
        raw = torch.from_numpy(tensor.data.copy())
        order = _match_rows(Blocks.parse(kind, raw).dequantize(), hf_weights[hf].float())
        tensors[hf], kinds[hf] = raw[order].contiguous(), kind
    return tensors, kinds


def _match_rows(dequantized: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Indices `order` with dequantized[order] == target bit for bit."""
    if torch.equal(dequantized, target):
        return torch.arange(target.shape[0])
    where = {row.numpy().tobytes(): i for i, row in enumerate(dequantized)}
    order = [where.get(row.numpy().tobytes()) for row in target]
    if None in order:
        raise ValueError("GGUF blocks do not dequantise to the checkpoint's weights")
    return torch.tensor(order)


def load_blocks(model_dir: Path) -> dict[str, Blocks]:
    """The checkpoint's blocks by Hugging Face weight name; none when it has none or no kernel runs here."""
    path = model_dir / BLOCKS_FILE
    if not path.is_file() or library() is None:
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        kinds = f.metadata()
        return {name: Blocks.parse(kinds[name], f.get_tensor(name)) for name in f.keys()}
