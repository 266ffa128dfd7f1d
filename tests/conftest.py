"""Shared fixtures: a random-weight checkpoint (dopd/testing.py) and prompts over the tiny vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dopd.testing import make_random_checkpoint

# Tests never touch the user's cache: embedded models are built once per session in a temp dir,
# unless DOPD_CACHE is set (CI sets it to keep the SmolLM2 conversion between steps).
if "DOPD_CACHE" not in os.environ:
    os.environ["DOPD_CACHE"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "dopd-test-cache")


@pytest.fixture(autouse=True)
def _stop_servers_a_test_left():
    """A test that fails before it stops its server would leave it (and its workers) running for the rest
    of the session; stop those here. Servers from wider-scoped fixtures, started before, are theirs to stop."""
    from serverproc import RUNNING

    before = set(RUNNING)
    yield
    for server in RUNNING - before:
        server.stop()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", heads=4, kv_heads=2, tie=False)


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Twelve prompts of different lengths (3 to 200 tokens) over the tiny vocabulary."""
    import random

    rng = random.Random(1)
    return [[rng.randrange(5, 4096) for _ in range(n)] for n in (3, 7, 12, 20, 33, 48, 64, 90, 117, 150, 180, 200)]


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0):
    """A random weight in GGUF blocks (gguf.Blocks) whose scales are exact float16s, as in a real file."""
    import torch

    from dopd.workers import gguf

    g = torch.Generator().manual_seed(seed)
    groups = cols // gguf.BLOCK
    d = (torch.rand(rows, groups, generator=g) * 0.02).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        return gguf.Blocks(kind, q, d, (-torch.rand(rows, groups, generator=g) * 0.1).half().float())
    return gguf.Blocks(kind, torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8), d, None)
