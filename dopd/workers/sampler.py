"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits), as vLLM
reports them by default. A seeded request draws its n-th token from a generator seeded with
(seed, n), so its output does not depend on which worker samples it, or on what else is in the
batch: a request migrated between workers mid-stream continues the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dopd.sampling_params import SamplingParams


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> list[SampledToken]:
    """`logits` `[n, vocab]` float32; `output_indices[i]`: how many tokens row i has generated so far."""
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        tokens[random_rows] = _sample_random(logits[random_rows], [params[i] for i in random_rows],
                                             [output_indices[i] for i in random_rows])
    token_list = tokens.tolist()
    results = [SampledToken(t) for t in token_list]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if logprob_rows:
        logprobs = torch.log_softmax(logits[logprob_rows], dim=-1)
        chosen = tokens[logprob_rows]
        chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
        ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
        k = max(params[i].logprobs for i in logprob_rows)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for j, i in enumerate(logprob_rows):
            r = results[i]
            r.logprob, r.rank = float(chosen_lp[j]), int(ranks[j])
            ki = params[i].logprobs
            if ki:
                r.top_ids, r.top_logprobs = top_ids[j, :ki].tolist(), top_lp[j, :ki].tolist()
    return results


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device).clamp(max=vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already cover top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # Exponential race (argmax p/E, E ~ Exp(1)) draws from `probs`, one generator per seeded row.
    noise = torch.empty_like(probs)
    for row, (p, index) in enumerate(zip(params, output_indices)):
        if p.seed is None:
            noise[row].exponential_()
        else:
            gen = torch.Generator(device=logits.device).manual_seed(hash((p.seed, index)) & (2**63 - 1))
            noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)
