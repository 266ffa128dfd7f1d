"""Load a Hugging Face checkpoint directory (config, tokenizer, safetensors) into our model code."""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import torch

from dopd.workers import gguf
from dopd.workers.cpu_kernels import LayerOps, library
from dopd.workers.model import CausalLM, Linear, ModelArch, Rotary, can_pack

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 4096

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {  # HF projection -> (our fused module, slot in the fused weight)
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_arch(model_dir: Path) -> ModelArch:
    from transformers import AutoConfig

    return ModelArch.from_hf(AutoConfig.from_pretrained(model_dir))


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, as transformers combines them."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def max_model_len(arch: ModelArch, requested: int | None) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window:  # our attention is full attention: stay inside the window
        limit = min(limit, arch.sliding_window)
    if requested is None:
        return min(limit, DEFAULT_MAX_MODEL_LEN)
    if requested > limit:
        raise ValueError(f"--max-model-len {requested} exceeds what the model supports ({limit})")
    return requested


def load_model(model_dir: Path, arch: ModelArch, dtype: torch.dtype, device: torch.device, max_len: int) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(arch, max_len, dtype)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = Rotary(arch, max_len, dtype).to(device)  # buffers cannot come from meta
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                target = _copy_weight(hf_name, f.get_tensor(hf_name), params, arch)
                if target:
                    loaded.add(target)
    missing = _expected_keys(params) - loaded
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {', '.join(sorted(missing)[:8])}")
    if device.type == "cpu" and can_pack(dtype):
        model.pack_for_cpu()
    if device.type == "cpu" and dtype == torch.float32 and library() is not None:
        model.use_cpu_kernels(LayerOps(library()))
        _attach_gguf_blocks(model, model_dir, arch)
        _drop_unused_float_weights(model)
        model.use_fused_decode()
    if device.type == "cpu":
        _return_freed_memory()
    return model.eval()


def _attach_gguf_blocks(model: CausalLM, model_dir: Path, arch: ModelArch) -> None:
    """Give every projection whose weights the checkpoint also holds as GGUF blocks its packed blocks."""
    blocks = gguf.load_blocks(model_dir)
    if not blocks:
        return
    unfused: dict[str, list[str]] = {}
    for hf_module, (fused, slot) in sorted(_FUSED.items(), key=lambda item: item[1][1]):
        unfused.setdefault(fused, []).append(hf_module)
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if name == "lm_head":
            sources = ["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"]
        else:
            layer, _, rest = name.removeprefix("layers.").partition(".")
            sources = [f"model.layers.{layer}.{m}.weight" for m in unfused.get(rest, [rest])]
        if all(s in blocks for s in sources):
            module.blocks = gguf.PackedWeight(gguf.Blocks.cat([blocks[s] for s in sources]))


def _drop_unused_float_weights(model: CausalLM) -> None:
    """Free the float32 matrix of every projection whose GGUF blocks and oneDNN-packed copy serve every batch
    size between them (Linear.weight_unused): 425 MB of a SmolLM2 worker's 1.5 GB. The tied LM head keeps
    its matrix: it is the embedding."""
    for module in model.modules():
        if isinstance(module, Linear) and module.weight_unused() and module.weight is not model.embed_tokens.weight:
            module.weight = None


def _return_freed_memory() -> None:
    """Hand the heap pages that loading freed (read buffers, dropped weights) back to the OS, which glibc
    keeps otherwise. With the dropped matrices a SmolLM2 worker's private memory goes 1.52 -> 0.97 GB;
    without this call it only went to 1.34 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, or not this way
        pass


def _copy_weight(hf_name: str, tensor: torch.Tensor, params: dict, arch: ModelArch) -> str | None:
    if hf_name == "lm_head.weight" and arch.tie_word_embeddings:
        return None
    name = hf_name.removeprefix("model.")
    match = _LAYER.match(hf_name)
    if match:
        layer, rest = match.groups()
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            fused, slot = _FUSED[module]
            target = f"layers.{layer}.{fused}.{kind}"
            _fused_slice(params[target], slot, arch).copy_(tensor)
            return f"{target}#{slot}"
        name = f"layers.{layer}.{rest}"
    if "rotary_emb" in name:
        return None
    if name not in params:
        raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
    params[name].data.copy_(tensor)
    return name


def _expected_keys(params: dict) -> set[str]:
    """Every parameter, and every slot of a fused one, must come from the checkpoint."""
    keys: set[str] = set()
    for name in params:
        slots = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 0
        keys.update([f"{name}#{i}" for i in range(slots)] if slots else [name])
    return keys


def _fused_slice(param: torch.Tensor, slot: int, arch: ModelArch) -> torch.Tensor:
    if param.shape[0] == 2 * arch.intermediate_size:  # gate_up_proj
        sizes = [arch.intermediate_size] * 2
    else:  # qkv_proj
        sizes = [arch.num_heads * arch.head_dim] + [arch.num_kv_heads * arch.head_dim] * 2
    start = sum(sizes[:slot])
    return param.data.narrow(0, start, sizes[slot])


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when there is one."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    return device


def default_max_batched_tokens(device: torch.device) -> int:
    # A CPU step over 512 tokens of a 135M model already takes ~0.5 s: more would stall decodes.
    return 8192 if device.type == "cuda" else 512


def default_attention(device: torch.device) -> str:
    return "flashinfer" if device.type == "cuda" else "torch"
