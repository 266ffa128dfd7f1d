"""DOPD: prefill/decode-disaggregated LLM serving that moves workers between roles while it runs.

`from dopd import LLM, SamplingParams` is the offline API. `import dopd` itself stays light: the
engine (torch, transformers) loads on first use, and FlashInfer only inside a CUDA worker.
"""

from dopd.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from dopd.llm import LLM

        return LLM
    raise AttributeError(f"module 'dopd' has no attribute {name!r}")
