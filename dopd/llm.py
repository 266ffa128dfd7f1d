"""The offline API, in vLLM's shapes: `LLM(model=...).generate(prompts, SamplingParams(...))`.

One engine in this process, no workers and no server: the quickest way to get tokens out of a
checkpoint, and the engine the server's workers run, seen from the outside.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from dopd.config import DEFAULT_MODEL
from dopd.embedded import resolve_model
from dopd.engine import EngineCore
from dopd.messages import AbortRequest, AddRequest
from dopd.outputs import RequestOutput
from dopd.request import Request
from dopd.sampling_params import SamplingParams
from dopd.workers import loader
from dopd.workers.runner import ModelRunner, RunnerSpec

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "auto",
                 block_size: int = 16, num_kv_blocks: int | None = None, kv_cache_gb: float | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 128,
                 max_num_batched_tokens: int | None = None, attention_backend: str | None = None,
                 enable_prefix_caching: bool = True) -> None:
        model_dir = resolve_model(model)
        dev = loader.resolve_device(device)
        self.tokenizer = loader.load_tokenizer(model_dir)
        self.max_model_len = loader.max_model_len(loader.load_arch(model_dir), max_model_len)
        spec = RunnerSpec(str(model_dir), str(dev), dtype, attention_backend or loader.default_attention(dev),
                          self.max_model_len, block_size, num_kv_blocks, kv_cache_gb)
        self.runner = ModelRunner(spec)
        budget = max_num_batched_tokens or loader.default_max_batched_tokens(dev)
        self.engine = EngineCore(self.runner, max_num_seqs, budget, loader.eos_token_ids(model_dir, self.tokenizer),
                                 enable_prefix_caching)
        self._ids = itertools.count()

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (False if a request holds blocks), e.g. between benchmark runs."""
        return self.engine.allocator.reset_cache()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt in one continuous batch; outputs come back in prompt order."""
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params)]
        by_id = {r.request_id: r for r in requests}
        for r in requests:
            self.engine.add(AddRequest(r.request_id, r.prompt_token_ids, r.params, r.max_tokens, hand_off=False))
        while self.engine.has_work():
            for out in self.engine.step().outputs:
                request = by_id[out.request_id]
                if request.add_token(out) and out.finish_reason is None:
                    self.engine.abort(AbortRequest(request.request_id))  # a stop string ended it
        return [r.to_output() for r in requests]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        return self.generate([{"prompt": p, "add_special_tokens": False} for p in prompts], sampling_params)

    def _make_request(self, prompt: Prompt, params: SamplingParams) -> Request:
        text, token_ids = _tokenize(self.tokenizer, prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}")
        room = self.max_model_len - len(token_ids)
        max_tokens = min(params.max_tokens or room, room)
        return Request(str(next(self._ids)), text, token_ids, params, max_tokens, self.tokenizer)


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]
    return prompts


def _tokenize(tokenizer, prompt: Prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        text = prompt["prompt"]
        return text, tokenizer.encode(text, add_special_tokens=prompt.get("add_special_tokens", True))
    return None, list(prompt)
