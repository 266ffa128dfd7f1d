"""Incremental detokenization with stop strings, exact by construction.

The streamed pieces concatenate to `tokenizer.decode(generated_ids)`: a token that ends inside a
multi-byte character yields nothing until the character is complete, and `flush()` at the end takes
whatever an unfinished character decodes to. Fast tokenizers use the
`tokenizers` library's own `DecodeStream`; any other tokenizer decodes a short window of ids and
emits what grew (the prefix/read-offset method of vLLM and TGI).

Stop strings are found across piece boundaries, and the last `len(longest stop) - 1` characters
are held back from the stream until they cannot begin a stop string any more, so a client never
receives text that is later cut.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None) -> None:
        self.stop = stop or []
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_emitted = 0  # characters of `text` already handed out
        self.stop_reason: str | None = None
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.token_ids: list[int] = []
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._step = lambda token_id: stream.step(backend, token_id)
        else:
            self._step = _WindowDecoder(tokenizer, skip_special_tokens).step

    def add(self, token_id: int) -> bool:
        """Append a token; True if a stop string now ends the text (the text is cut before it)."""
        self.token_ids.append(token_id)
        piece = self._step(token_id)
        if not piece:
            return False
        searched_from = max(0, len(self.text) - self.holdback)
        self.text += piece
        for stop in self.stop:
            at = self.text.find(stop, searched_from)
            if at != -1:
                self.text = self.text[:at]
                self.stop_reason = stop
                return True
        return False

    def flush(self) -> None:
        """At the end: an output that stops inside a multi-byte character still decodes to something
        (a replacement character); take that tail so the text equals decoding all ids at once."""
        if self.stop_reason is None:
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
            if full.startswith(self.text):
                self.text = full

    def delta(self, finished: bool) -> str:
        """The text not yet handed out, minus what could still turn out to start a stop string."""
        end = len(self.text) if finished else max(self.num_emitted, len(self.text) - self.holdback)
        out = self.text[self.num_emitted : end]
        self.num_emitted = end
        return out


class _WindowDecoder:
    """For tokenizers without a `tokenizers` backend: decode a sliding window of ids."""

    def __init__(self, tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character, or a token that decodes to nothing yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
