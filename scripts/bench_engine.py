"""Engine speed: our offline engine against transformers' generate() on the same model and prompts.

Greedy decoding of a fixed number of tokens (EOS ignored on both sides), CPU, batch 1 and 16 by
default; the token ids of both are checked equal before a speed is reported. transformers runs
each batch padded on the left, as its generate() needs; we run it as one continuous batch. Each
engine runs --repeats times per batch size, the two alternated, and their median times are compared.

Every prompt is different, but all of them start with the chat template's system prompt, as a chat
server's do. Our engine's prefix cache is emptied before each measured run, so what it saves is
only that system prompt's first block(s), shared inside one batch; --no-prefix-caching turns it off.

    python scripts/bench_engine.py [--model smollm2] [--batch-sizes 1 16] [--new-tokens 64] [--json OUT]
                                   [--repeats 3] [--no-prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

import torch  # noqa: E402

from dopd import LLM, SamplingParams  # noqa: E402
from dopd.embedded import resolve_model  # noqa: E402
from dopd.workers.cpu_kernels import cpu_model  # noqa: E402

TOPICS = ["a dragon", "the sea", "a city at night", "an old clock", "a robot learning to paint", "the moon",
          "a lost key", "a quiet library", "a mountain village", "a talking cat", "the first snow", "a broken violin",
          "a train to nowhere", "a garden in winter", "a lighthouse keeper", "a map of the stars"]


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    """Chat prompts, all different (16 topics), of different lengths (1-4 sentences each)."""
    out = []
    for i in range(n):
        ask = f"Tell me a story about {TOPICS[i % len(TOPICS)]}. " * (1 + i % 4)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_transformers(model_dir: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    model.generation_config.eos_token_id = None
    return model


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    model.generate(ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False, pad_token_id=pad)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, **kwargs)
    elapsed = time.perf_counter() - start
    return out[:, width:].tolist(), elapsed


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p[:8]} for p in prompts], SamplingParams(max_tokens=2, temperature=0))
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return [o.outputs[0].token_ids for o in outs], elapsed, sum(o.num_cached_tokens or 0 for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a checkpoint directory, 'tiny' or the embedded default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="weights of both engines (our KV and attention stay float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each engine per batch size, alternated; medians are reported (this VM's "
                             "speed moves by tens of percent from one run to the next)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="our engine's prefix cache (on by default, as in the server)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    llm = LLM(model=str(model_dir), device="cpu", dtype=args.dtype, enable_prefix_caching=args.prefix_caching)
    hf_model = load_transformers(model_dir, args.dtype)
    rows = []
    for batch in args.batch_sizes:
        prompts = prompts_for(llm.tokenizer, batch)
        hf_times, our_times, equal = [], [], True
        for _ in range(args.repeats):
            hf_ids, hf_time = run_transformers(hf_model, prompts, args.new_tokens)
            our_ids, our_time, cached = run_ours(llm, prompts, args.new_tokens)
            hf_times.append(hf_time)
            our_times.append(our_time)
            equal = equal and hf_ids == our_ids
        hf_time, our_time = statistics.median(hf_times), statistics.median(our_times)
        tokens = batch * args.new_tokens
        rows.append({
            "model": args.model, "dtype": args.dtype, "batch": batch, "new_tokens": args.new_tokens,
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "transformers_tok_s": tokens / hf_time, "dopd_tok_s": tokens / our_time, "speedup": hf_time / our_time,
            "speedup_min_max": [min(h / o for h, o in zip(hf_times, our_times)),
                                max(h / o for h, o in zip(hf_times, our_times))],
            "outputs_equal": equal, "prompt_tokens": sum(map(len, prompts)), "prompt_tokens_cached": cached,
        })
    print(json.dumps(rows, indent=2))
    print()
    print("| model | dtype | batch | prompt tokens (cached) | transformers tok/s | dopd tok/s | speedup "
          "| per-run speedups | outputs equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["speedup_min_max"]
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['prompt_tokens']} ({r['prompt_tokens_cached']}) | "
              f"{r['transformers_tok_s']:.1f} | {r['dopd_tok_s']:.1f} | {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f}x "
              f"| {r['outputs_equal']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not all(r["outputs_equal"] for r in rows):
        sys.exit("outputs differ: the speeds above are not comparable")


if __name__ == "__main__":
    main()
