"""Text <-> token ids, when the checkpoint ships a tokenizer.json; otherwise ids only.

Streaming decode (DecodeStream): the text a few new tokens add, without decoding the whole output
each step and without emitting half a character. A byte-level token can end inside a multi-byte
UTF-8 character, which decodes to U+FFFD until the next token completes it; so text is released only
once it no longer ends in U+FFFD, decoding a window from the previous release point (vLLM's
prefix/read offsets). The window starts a few tokens back so tokenizers that drop a word's leading
space at the start of a decode (SentencePiece's Metaspace) still give the space.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

CONTEXT_TOKENS = 6  # prompt tokens a DecodeStream starts from, for the first new token's leading space


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


class DecodeStream:
    """The text of a growing list of generated tokens, released piece by piece."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix = 0  # the window decoded each time starts here
        self.read = len(self.ids)  # text up to here has been released

    def add(self, token_ids: list[int]) -> str:
        """The text these tokens complete ("" while a character is still partial)."""
        self.ids += token_ids
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left at the end of the output, a partial character included (as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
