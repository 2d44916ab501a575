"""Text in and out, through the optional ``tokenizers`` package and a checkpoint's ``tokenizer.json``.

Token ids are the interface everywhere else; text is a convenience of the CLI,
batch jobs and the server. A checkpoint of random weights (``make_checkpoint.py``)
gets a small byte-level BPE tokenizer; ids it does not know (the model's
vocabulary is usually larger) are shown as ``<id>``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that never drops an id when decoding."""

    def __init__(self, inner):
        self.inner = inner
        self.size = inner.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        """The tokenizer in ``path/tokenizer.json``, or None when there is none or ``tokenizers`` is missing."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            return None
        try:
            from tokenizers import Tokenizer as Inner
        except ImportError:
            return None
        try:
            return cls(Inner.from_file(str(file)))
        except Exception as e:  # tokenizers raises its own exception types
            raise InputError(f"{file}: not a readable tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if 0 <= i < self.size:
                run.append(i)
                continue
            if run:
                out.append(self.inner.decode(run))
                run = []
            out.append(f"<{i}>")
        if run:
            out.append(self.inner.decode(run))
        return "".join(out)
