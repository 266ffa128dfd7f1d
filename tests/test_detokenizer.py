"""Streaming text equals decoding all ids at once, multi-byte characters included; stop strings."""

from __future__ import annotations

import random

import pytest

from dopd.detokenizer import IncrementalDetokenizer
from dopd.embedded import resolve_model
from dopd.workers.loader import load_tokenizer

TEXT = "naïve café — 世界 🎉👩‍👩‍👧 ok\nΣίσυφος ∑∫ ★ end"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


def stream(tokenizer, ids, **kwargs) -> tuple[str, IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = []
    for t in ids:
        stopped = d.add(t)
        pieces.append(d.delta(finished=stopped))
        if stopped:
            break
    if not d.stop_reason:
        d.flush()
    pieces.append(d.delta(finished=True))
    return "".join(pieces), d


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    # the byte-level BPE really does split some characters over several tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    text, _ = stream(tokenizer, ids)
    assert text == tokenizer.decode(ids) == TEXT


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_stream_exactly(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    text, _ = stream(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_output_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    cut = next(i for i in range(len(ids), 0, -1) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    text, _ = stream(tokenizer, ids[:cut])
    assert text == tokenizer.decode(ids[:cut])


def test_window_decoder_for_tokenizers_without_a_rust_backend(tokenizer):
    class SlowTokenizer:  # only decode(): what a pure-Python tokenizer offers
        def decode(self, ids, skip_special_tokens=True):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(TEXT)
    text, _ = stream(SlowTokenizer(), ids)
    assert text == TEXT


def test_stop_string_cuts_and_is_never_streamed(tokenizer):
    ids = tokenizer.encode("alpha beta STOP gamma")
    d = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    streamed = []
    for t in ids:
        stopped = d.add(t)
        streamed.append(d.delta(finished=stopped))
        if stopped:
            break
    assert stopped and d.stop_reason == "STOP"
    assert "".join(streamed) == "alpha beta "
    assert not any("S" in piece for piece in streamed)  # held back until it could not start a stop string


def test_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode("one two three")
    text, d = stream(tokenizer, ids, stop=["o thr"])
    assert text == "one tw" and d.stop_reason == "o thr"
