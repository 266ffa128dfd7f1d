"""scripts/gpu_check.py on CPU, the torch backend as its own candidate: the harness runs end to end before
an H200 is lent, its float64 reference agrees with the torch backend, and a wrong backend fails it."""

from __future__ import annotations

import json

from dopd.workers.attention import TorchAttention
from scripts import gpu_check


def test_harness_passes_the_torch_backend(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--backend", "torch", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    attention = [r for r in rows if r["check"] == "attention"]
    engine = [r for r in rows if r["check"] == "engine"]
    assert len(attention) == len(gpu_check.ATTENTION_CASES) and len(engine) == 2 * len(gpu_check.ENGINE_MODELS)
    for r in attention:
        # bf16 arithmetic against float64: a real difference, in the range bf16 operands give
        assert r["kv_written"] and 1e-4 < r["decode_error"] < 1e-2 and 1e-4 < r["prefill_error"] < 1e-2, r
    for r in engine:
        assert r["sequences_equal"] == len(gpu_check.PROMPT_LENGTHS), r
    [server] = [r for r in rows if r["check"] == "server"]  # 2 workers, shared-memory KV handoff on CPU
    n = len(gpu_check.PROMPT_LENGTHS)
    assert server["sequences_equal"] == n and server["handoffs"] >= n, server


class OffByOneLayer(TorchAttention):
    """Reads and writes the layer below the one asked for: the mistake a strided per-layer view invites."""

    def forward(self, layer, q, k, v):
        return super().forward(layer - 1, q, k, v)


class UnscaledScores(TorchAttention):
    """Forgets the 1/sqrt(head_dim) on the scores."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.scale = 1.0


def test_a_wrong_backend_fails(monkeypatch):
    import torch

    case, cpu = gpu_check.ATTENTION_CASES[1], torch.device("cpu")
    rows = {}
    for wrong in (OffByOneLayer, UnscaledScores):
        monkeypatch.setattr(gpu_check, "make_attention", lambda name, pool, *shape, cls=wrong: cls(pool, *shape))
        rows[wrong] = gpu_check.check_attention(wrong.__name__, case, torch.bfloat16, cpu, seed=0)
    assert not rows[OffByOneLayer]["kv_written"] and not rows[OffByOneLayer]["passed"]
    assert rows[UnscaledScores]["kv_written"] and rows[UnscaledScores]["error"] > 0.1
    assert not rows[UnscaledScores]["passed"]
