"""A decode step's decoder layers, one C++ call each (`csrc/decode_layer.cpp`).

For a model whose every projection is in GGUF blocks (the embedded SmolLM2), on CPU in float32
with our kernels: the call runs the kernels the layer's modules would run, in the same order, so a
step gives the same bits either way (tests/test_fused_decode.py); only the Python and torch glue
between them goes. Steps with a prefill, or more rows than the block kernel serves, take the
modules as before.
"""

from __future__ import annotations

import ctypes

import torch

from dopd.workers.attention import TorchAttention
from dopd.workers.cpu_kernels import library
from dopd.workers.gguf import MAX_ROWS, PackedWeight

_ptr, _i32, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
_KINDS = {"q4_1": 0, "q8_0": 1}


class Projection(ctypes.Structure):
    _fields_ = [("codes", _ptr), ("scale", _ptr), ("min", _ptr), ("rows", _i32), ("cols", _i32), ("kind", _i32)]


class LayerWeights(ctypes.Structure):
    _fields_ = [("qkv", Projection), ("o", Projection), ("gate_up", Projection), ("down", Projection),
                ("input_norm", _ptr), ("post_norm", _ptr), ("eps", _f32), ("hidden", _i32), ("intermediate", _i32),
                ("num_heads", _i32), ("num_kv_heads", _i32), ("head_dim", _i32)]


class Step(ctypes.Structure):
    _fields_ = [("rows", _i32), ("cos", _ptr), ("sin", _ptr), ("pool", _ptr), ("num_layers", _i32),
                ("block_size", _i32), ("block_tables", _ptr), ("table_width", _i32), ("kv_lens", _ptr),
                ("write_rows", _ptr), ("scale", _f32), ("scratch", _ptr)]


def _projection(w: PackedWeight) -> Projection:
    return Projection(w.codes.data_ptr(), w.scale.data_ptr(), 0 if w.min is None else w.min.data_ptr(),
                      w.rows, w.cols, _KINDS[w.kind])


class FusedDecode:
    """The layers of a `CausalLM` as C structs; `run` advances the residual stream of a decode step.

    The structs point into the model's own tensors: the model that holds this keeps them alive."""

    def __init__(self, model) -> None:
        self._lib = library()
        arch = model.arch
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(
                _projection(attn.qkv_proj.blocks), _projection(attn.o_proj.blocks),
                _projection(mlp.gate_up_proj.blocks), _projection(mlp.down_proj.blocks),
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                arch.rms_norm_eps, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
                arch.head_dim,
            ))
        floats = self._lib.dopd_decode_scratch_floats(ctypes.addressof(self.layers[0]), MAX_ROWS)
        self.scratch = torch.empty(floats, dtype=torch.float32)

    @staticmethod
    def supports(model) -> bool:
        """Every layer's projections in blocks, no biases, float32, kernels that take its head shape."""
        lib, arch = library(), model.arch
        if lib is None or arch.qkv_bias or arch.mlp_bias or model.embed_tokens.weight.dtype != torch.float32:
            return False
        if not lib.dopd_paged_decode_attention_supports(arch.num_heads // arch.num_kv_heads, arch.head_dim):
            return False
        return all(p.blocks is not None for layer in model.layers
                   for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                             layer.mlp.down_proj))

    @staticmethod
    def serves(attn, num_tokens: int) -> bool:
        """A step of decodes only, within the block kernel's rows, over our in-place decode attention."""
        return (isinstance(attn, TorchAttention) and attn.kernels is not None and attn.num_decodes == num_tokens
                and num_tokens <= MAX_ROWS)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: TorchAttention) -> None:
        """x [tokens, hidden] float32, contiguous, in place: through every layer."""
        pool = attn.pool
        step = Step(x.shape[0], cos.data_ptr(), sin.data_ptr(), pool.tensor.data_ptr(), attn.num_layers,
                    pool.block_size, attn.decode_tables.data_ptr(), attn.decode_tables.shape[1],
                    attn.decode_lens.data_ptr(), attn.write_rows.data_ptr(), attn.scale, self.scratch.data_ptr())
        for i, layer in enumerate(self.layers):
            status = self._lib.dopd_decode_layer(ctypes.addressof(layer), ctypes.addressof(step), i, x.data_ptr())
            if status != 0:
                raise RuntimeError(f"decode layer kernel refused the shape (status {status})")
