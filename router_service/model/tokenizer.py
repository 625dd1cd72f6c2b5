"""Text <-> token ids, when the checkpoint ships a tokenizer.json; otherwise ids only."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, inner: _HFTokenizer):
        self.inner = inner

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        """The checkpoint's tokenizer, or None when it has no tokenizer.json (serve token ids only)."""
        file = Path(path) / "tokenizer.json"
        return cls(_HFTokenizer.from_file(str(file))) if file.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)
