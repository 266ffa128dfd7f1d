"""Random-weight checkpoints and transformers' reference outputs: what the tests and
scripts/gpu_check.py check our engine against, made offline with transformers' own classes."""

from __future__ import annotations

from pathlib import Path


def make_random_checkpoint(path: Path, arch: str = "llama", *, hidden: int = 128, layers: int = 2, heads: int = 4,
                           kv_heads: int = 2, intermediate: int = 256, tie: bool = False, init_range: float = 0.25,
                           seed: int = 0, **extra) -> Path:
    """A random-weight Llama or Qwen2 checkpoint with the tiny BPE tokenizer, saved as safetensors.

    `init_range` is large on purpose: with near-uniform logits greedy choices hinge on the last bit
    and two correct implementations may disagree.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dopd.embedded import resolve_model
    from dopd.workers.loader import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("tiny"))
    cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cls_config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=tie, initializer_range=init_range, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, architectures=[cls_model.__name__], **extra,
    )
    torch.manual_seed(seed)
    model = cls_model(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def transformers_greedy(model_dir: Path, prompts: list[list[int]],
                        max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' generate(do_sample=False) on CPU in float32, one prompt at a time (no padding), never
    stopping at EOS; plus the chosen tokens' logprobs from its float32 logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    for ids in prompts:
        # The mask is explicit: without one, generate() takes every pad_token_id in the prompt for padding.
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
        new = out.sequences[0, len(ids):].tolist()
        lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
        tokens.append(new)
        logprobs.append(lps)
    return tokens, logprobs
