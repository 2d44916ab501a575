"""Text in and out, through the optional ``tokenizers`` package and a checkpoint's ``tokenizer.json``.

Token ids are the interface everywhere else; text is a convenience of the CLI
and of batch jobs. A checkpoint of random weights (``make_checkpoint.py``) gets a
small byte-level BPE tokenizer; ids it does not know (the model's vocabulary is
usually larger) are shown as ``<id>``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

# A few sentences to train the demo tokenizer on: enough merges for readable ids.
_CORPUS = [
    "offload runs transformer models that are larger than the memory of one GPU.",
    "The weights of each decoder layer live in GPU memory, in pinned host memory, or on a peer GPU.",
    "While one layer computes, the next layer's weights are copied over the link on a side stream.",
    "A plan places every layer before loading and predicts the time of a decode step.",
    "The quick brown fox jumps over the lazy dog. Hello world! 0 1 2 3 4 5 6 7 8 9",
]


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


def train_demo_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids trained on a built-in text (needs ``tokenizers``)."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Inner(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 512), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok
