"""Text <-> token ids, when the checkpoint ships a tokenizer.json; otherwise ids only."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, inner: _HFTokenizer):
        self.inner = inner

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        """The checkpoint's tokenizer, or None when it has no tokenizer.json (serve token ids only)."""
        file = Path(path) / "tokenizer.json"
        return cls(_HFTokenizer.from_file(str(file))) if file.is_file() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for text that already holds them (a rendered chat template)."""
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def stream(self) -> "TextStream":
        """An incremental decoder for one generation: O(1) work per token (the whole text is never
        decoded again), and bytes of an unfinished UTF-8 character wait for the token completing it."""
        return TextStream(self.inner)


class TextStream:
    def __init__(self, inner: _HFTokenizer):
        self.inner, self._state = inner, DecodeStream(skip_special_tokens=False)

    def add(self, ids: list[int]) -> str:
        """The text the new tokens complete."""
        return "".join(piece for i in ids if (piece := self._state.step(self.inner, i)) is not None)
