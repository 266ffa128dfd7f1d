"""The engine's CUDA checks, in one run: FlashInfer attention against the torch backend, and greedy
decoding through each backend. Prints JSON and a table; exits 1 when a check fails.

1. `attention`: one step of several shapes (Llama-3-8B's 32/8 heads of 128, SmolLM2's 9/3 of 64,
   Qwen2-0.5B's 14/2 of 64 at block size 1, 16/16 of 128 at block size 128), each a mixed batch of
   decodes, whole prompts and prompt chunks on top of cached tokens, over a pool of fresh random
   KV with shuffled block tables. Every backend's output is compared with float64 attention on
   the CPU by ||out - ref|| / ||ref|| (bf16 operands land between 1e-3 and 1e-2; pass at <= 1e-2,
   finite everywhere), and the new keys and values must sit bit for bit in their slots.
2. `engine`: random-weight Llama (GQA) and Qwen2 (QKV bias, tied embeddings) checkpoints through
   `LLM.generate`, 8 prompts of different lengths decoded in one batch: the torch backend in
   float32 on the device gives transformers' greedy tokens (CPU, float32) and logprobs within 1e-4;
   the candidate backend in bf16 gives the torch backend's bf16 first tokens, and chosen-token
   logprobs within 0.05 while the two agree (a later near-tie may part them: reported, not failed).
3. `server`: `dopd.py` with 2 workers on the one device, 1 prefill + 1 decode, float32, torch backend:
   every request's KV crosses between the worker processes (CUDA IPC on a GPU), and the completions
   must be transformers' greedy text.

    python scripts/gpu_check.py [--backend flashinfer] [--device cuda] [--json OUT]

On a machine without CUDA, `--device cpu --backend torch` runs the same harness with the torch backend
as its own candidate (tests/test_gpu_check.py does), so the script is known to run before an H200 is
lent. How to carry FlashInfer to the device machine: scripts/gpu_bundle.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]  # see scripts/profile.py

import torch  # noqa: E402

from dopd import LLM, SamplingParams  # noqa: E402
from dopd.kv.pool import KVPool, KVPoolShape  # noqa: E402
from dopd.testing import make_random_checkpoint, transformers_greedy  # noqa: E402
from dopd.workers.attention import AttentionBatch, make_attention  # noqa: E402

ATTENTION_TOLERANCE = 1e-2  # bf16 operands: 1e-3..1e-2 against a float64 reference
LOGPROB_TOLERANCE_FP32 = 1e-4
LOGPROB_TOLERANCE_BF16 = 0.05


@dataclass(frozen=True)
class AttentionCase:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int


ATTENTION_CASES = (
    AttentionCase("llama3-8b", 32, 8, 128, 16),
    AttentionCase("smollm2", 9, 3, 64, 16),
    AttentionCase("qwen2-0.5b", 14, 2, 64, 1),
    AttentionCase("mha-128", 16, 16, 128, 128),
)
# (query length, KV length after the step): decodes, a one-token chunk, whole prompts, chunks on a cache.
STEP_SEQUENCES = ((1, 1), (1, 17), (1, 300), (1, 1030), (1, 64), (5, 5), (77, 77), (600, 600), (64, 700), (3, 40))
LAYERS, CHECKED_LAYER = 3, 1  # a middle layer: its offset into the block-major pool is exercised


def random_step(case: AttentionCase, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """A pool of random KV, one step's batch over it (decodes first, as the runner orders them) and the
    step's new q, k, v."""
    bs = case.block_size
    seqs = sorted(STEP_SEQUENCES, key=lambda s: s[0] != 1)
    needed = [-(-kv // bs) + 1 for _, kv in seqs]  # one block past the last: tables may run long
    ids = torch.randperm(sum(needed) + 8, generator=gen).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(ids[start:start + n])
        start += n
    shape = KVPoolShape(len(ids), LAYERS, bs, case.kv_heads, case.head_dim)
    pool = KVPool.allocate(shape, dtype, device)
    pool.tensor.copy_(torch.randn(shape.dims, generator=gen).to(dtype))
    slots = [t[p // bs] * bs + p % bs for (q, kv), t in zip(seqs, tables) for p in range(kv - q, kv)]
    batch = AttentionBatch([q for q, _ in seqs], [kv for _, kv in seqs], tables,
                           torch.tensor(slots, dtype=torch.long, device=device), sum(q == 1 for q, _ in seqs))
    # Views into one fused q|k|v tensor, strided as the model's projection hands them over.
    qkv = torch.randn(len(slots), case.heads + 2 * case.kv_heads, case.head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split((case.heads, case.kv_heads, case.kv_heads), dim=1)
    return pool, batch, q, k, v


def reference_attention(pool: torch.Tensor, batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, layer: int) -> torch.Tensor:
    """Float64 on the CPU, written out plainly: the new KV into its slots, then causal attention of each
    query over every key at or before its position, GQA by repeating each KV head over its group."""
    pool = pool.detach().cpu().double()
    q, k, v = (x.detach().cpu().double() for x in (q, k, v))
    bs, heads, kv_heads, dim = pool.shape[3], q.shape[1], k.shape[1], q.shape[2]
    flat = pool[:, layer].permute(1, 0, 2, 3, 4).reshape(2, -1, kv_heads, dim)  # [k|v, slot, head, dim]
    slots = batch.slot_mapping.cpu()
    flat[0, slots], flat[1, slots] = k, v
    out, row = torch.empty_like(q), 0
    for q_len, kv_len, table in zip(batch.q_lens, batch.kv_lens, batch.block_tables):
        positions = torch.arange(kv_len)
        seq_slots = torch.tensor(table)[positions // bs] * bs + positions % bs
        keys = flat[0, seq_slots].repeat_interleave(heads // kv_heads, dim=1)  # [kv_len, heads, dim]
        values = flat[1, seq_slots].repeat_interleave(heads // kv_heads, dim=1)
        query = q[row:row + q_len]
        scores = torch.einsum("qhd,khd->hqk", query, keys) / math.sqrt(dim)
        query_pos = torch.arange(kv_len - q_len, kv_len)
        scores.masked_fill_(positions[None, None, :] > query_pos[None, :, None], float("-inf"))
        out[row:row + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        row += q_len
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def check_attention(backend: str, case: AttentionCase, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    pool, batch, q, k, v = random_step(case, dtype, device, gen)
    ref = reference_attention(pool.tensor, batch, q, k, v, CHECKED_LAYER)
    attn = make_attention(backend, pool, case.heads, case.kv_heads, case.head_dim)
    attn.prepare(batch)
    out = attn.forward(CHECKED_LAYER, q, k, v)
    if device.type == "cuda":
        torch.cuda.synchronize()
    keys, values = pool.layer(CHECKED_LAYER)
    blocks, offsets = batch.slot_mapping // case.block_size, batch.slot_mapping % case.block_size
    written = torch.equal(keys[blocks, offsets], k) and torch.equal(values[blocks, offsets], v)
    d = batch.num_decodes
    errors = {"error": relative_error(out, ref), "decode_error": relative_error(out[:d], ref[:d]),
              "prefill_error": relative_error(out[d:], ref[d:])}
    return {"check": "attention", "case": case.name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            **errors, "kv_written": written, "passed": written and errors["error"] <= ATTENTION_TOLERANCE}


ENGINE_MODELS = {  # head_dim 64, as FlashInfer's kernels take; decisive weights (see make_random_checkpoint)
    "llama-gqa": dict(arch="llama", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512),
    "qwen2-tied": dict(arch="qwen2", hidden=256, layers=2, heads=4, kv_heads=1, intermediate=512, tie=True),
}
Reference = tuple[list[list[int]], list[list[float]]]  # transformers' greedy tokens and their logprobs
SERVER_MODEL = "llama-gqa"  # the one also served by dopd.py with 2 workers
PROMPT_LENGTHS = (3, 9, 17, 33, 50, 71, 100, 130)
NEW_TOKENS = 16
ENGINE_KV_BLOCKS = 512  # 8,192 tokens: the prompts and their outputs, not the GPU's whole free memory per LLM


def _generate(model_dir: Path, device: torch.device, dtype: str, backend: str, prompts: list[list[int]]):
    llm = LLM(model=str(model_dir), device=str(device), dtype=dtype, attention_backend=backend,
              num_kv_blocks=ENGINE_KV_BLOCKS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs


def _agreement(tokens, logprobs, ref_tokens, ref_logprobs) -> tuple[int, float, float]:
    """(sequences equal to the reference, mean fraction of tokens before they part, the largest chosen-token
    logprob difference while they agree)."""
    equal, agreed, worst = 0, [], 0.0
    for ours, lps, theirs, ref_lps in zip(tokens, logprobs, ref_tokens, ref_logprobs):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
        equal += same == len(theirs)
        agreed.append(same / len(theirs))
        worst = max([worst] + [abs(a - b) for a, b in zip(lps[:same], ref_lps[:same])])
    return equal, sum(agreed) / len(agreed), worst


def engine_model(name: str, workdir: Path) -> tuple[Path, list[list[int]]]:
    """One of ENGINE_MODELS saved under `workdir`, and its prompts (fresh random ids, a generator per model)."""
    model_dir = make_random_checkpoint(workdir / name, **ENGINE_MODELS[name])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(list(ENGINE_MODELS).index(name))
    return model_dir, [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def check_engine_float32(name: str, model_dir: Path, prompts: list[list[int]], reference: Reference,
                         device: torch.device) -> dict:
    """The torch backend in float32 on the device against transformers' greedy decoding (CPU, float32)."""
    ref_tokens, ref_logprobs = reference
    tokens, logprobs = _generate(model_dir, device, "float32", "torch", prompts)
    equal, agreed, worst = _agreement(tokens, logprobs, ref_tokens, ref_logprobs)
    return {"check": "engine", "case": name, "backend": "torch", "dtype": "float32",
            "against": "transformers float32", "sequences_equal": equal, "tokens_agreed": agreed,
            "logprob_diff": worst, "passed": equal == len(prompts) and worst <= LOGPROB_TOLERANCE_FP32}


def check_engine_half(name: str, model_dir: Path, prompts: list[list[int]], device: torch.device, half: str,
                      backend: str) -> dict:
    """The candidate backend in bf16 (or fp16) against the torch backend in the same dtype."""
    base_tokens, base_logprobs = _generate(model_dir, device, half, "torch", prompts)
    tokens, logprobs = _generate(model_dir, device, half, backend, prompts)
    equal, agreed, worst = _agreement(tokens, logprobs, base_tokens, base_logprobs)
    first_tokens = all(t[0] == b[0] for t, b in zip(tokens, base_tokens))
    return {"check": "engine", "case": name, "backend": backend, "dtype": half, "against": f"torch {half}",
            "sequences_equal": equal, "tokens_agreed": agreed, "logprob_diff": worst,
            "passed": first_tokens and worst <= LOGPROB_TOLERANCE_BF16}


def check_server(name: str, model_dir: Path, prompts: list[list[int]], reference: Reference,
                 device: torch.device) -> dict:
    """`dopd.py` with 2 workers on the device, 1 prefill + 1 decode, float32 and the torch backend: every
    request's KV is handed from one worker process to the other (CUDA IPC on a GPU, shared memory on a
    CPU), and the completions must be transformers' greedy text."""
    import asyncio

    import aiohttp

    from dopd.workers.loader import load_tokenizer
    from scripts.compare import launched

    tokenizer = load_tokenizer(model_dir)
    expected = [tokenizer.decode(t, skip_special_tokens=True) for t in reference[0]]
    argv = ["--model", str(model_dir), "--gpus", "2", "--mode", "static", "--pd-ratio", "1:1",
            "--device", device.type, "--dtype", "float32", "--engine", "torch",
            "--num-kv-blocks", str(ENGINE_KV_BLOCKS), "--log-level", "warning"]

    async def run() -> tuple[list[str], float]:
        async with launched(argv, model_dir.parent / "server.log") as url, aiohttp.ClientSession() as session:
            async def one(ids: list[int]) -> str:
                body = {"model": str(model_dir), "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                        "ignore_eos": True}
                async with session.post(url + "/v1/completions", json=body) as r:
                    return (await r.json())["choices"][0]["text"]

            texts = await asyncio.gather(*(one(p) for p in prompts))
            async with session.get(url + "/metrics") as r:
                metrics = await r.text()
        count = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("dopd:kv_handoff_seconds_count"))
        return list(texts), count

    texts, handoffs = asyncio.run(run())
    equal = sum(t == e for t, e in zip(texts, expected))
    return {"check": "server", "case": f"{name} 1P+1D", "backend": "torch", "dtype": "float32",
            "against": "transformers float32", "sequences_equal": equal, "handoffs": handoffs,
            "passed": equal == len(prompts) and handoffs >= len(prompts)}


def _guarded(rows: list[dict], what: dict, run) -> None:
    """Run one check; an exception fails that check alone, so one run reports on all of them."""
    start = time.perf_counter()
    try:
        result = run()
        rows.extend(result if isinstance(result, list) else [result])
        print(f"{what['check']} {what.get('case', '')} {what['backend']}: {time.perf_counter() - start:.1f} s "
              "(the first use of a FlashInfer kernel includes its JIT build)", flush=True)
    except Exception as e:  # noqa: BLE001 - a failing backend is a result here
        traceback.print_exc()
        rows.append({**what, "passed": False, "exception": f"{type(e).__name__}: {e}"})


def run_checks(backend: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows: list[dict] = []
    for seed, case in enumerate(ATTENTION_CASES):
        for name in dict.fromkeys(("torch", backend)):
            _guarded(rows, {"check": "attention", "case": case.name, "backend": name},
                     lambda: check_attention(name, case, dtype, device, seed))
    half = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ENGINE_MODELS:
            model_dir, prompts = engine_model(name, Path(tmp))
            reference = transformers_greedy(model_dir, prompts, NEW_TOKENS)
            _guarded(rows, {"check": "engine", "case": name, "backend": "torch", "dtype": "float32"},
                     lambda: check_engine_float32(name, model_dir, prompts, reference, device))
            _guarded(rows, {"check": "engine", "case": name, "backend": backend, "dtype": half},
                     lambda: check_engine_half(name, model_dir, prompts, device, half, backend))
            if name == SERVER_MODEL:
                _guarded(rows, {"check": "server", "case": f"{name} 1P+1D", "backend": "torch", "dtype": "float32"},
                         lambda: check_server(name, model_dir, prompts, reference, device))
    return rows


def print_table(rows: list[dict]) -> None:
    print("| check | case | backend | dtype | error (decode / prefill) or agreement | passed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "exception" in r:
            detail = r["exception"][:80]
        elif r["check"] == "server":
            detail = (f"vs {r['against']}: {r['sequences_equal']}/{len(PROMPT_LENGTHS)} completions equal, "
                      f"{r['handoffs']:.0f} KV handoffs")
        elif r["check"] == "attention":
            detail = (f"{r['error']:.2e} ({r['decode_error']:.2e} / {r['prefill_error']:.2e}), "
                      f"KV written {r['kv_written']}")
        else:
            detail = (f"vs {r['against']}: {r['sequences_equal']}/{len(PROMPT_LENGTHS)} equal, "
                      f"{r['tokens_agreed']:.0%} of tokens, logprobs within {r['logprob_diff']:.1e}")
        print(f"| {r['check']} | {r.get('case', '')} | {r['backend']} | {r.get('dtype', '')} | {detail} "
              f"| {r['passed']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="flashinfer", help="the candidate attention backend")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows = run_checks(args.backend, device, getattr(torch, args.dtype))
    print(json.dumps(rows, indent=2))
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
