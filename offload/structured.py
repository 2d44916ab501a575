"""A tiny model whose next-token distributions are not flat: trained for seconds on a Markov corpus.

Random weights give nearly uniform next-token distributions, so they cannot show
what quantization does to a model's choices. ``MarkovCorpus`` is text with
structure: each token is followed by one of four tokens (its own, drawn once
from the seed) with probabilities 0.6, 0.2, 0.12 and 0.08, so a model that has
learned it has a clear favourite at every step and a perplexity near 3.
``train_structured_checkpoint`` trains a small Llama on it with ``transformers``
(a test dependency) on the CPU and saves it as a checkpoint; ``structured_checkpoint``
does that once and caches it. Tests and ``benchmarks/bench_quality.py`` use it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .options import cache_dir

STRUCTURED_NAME = "structured-v1"
# Small enough to train in seconds on two CPU cores. 64 and 176 are input dimensions that
# int4's default group size of 128 does not divide (they take 64 and 16).
STRUCTURED_CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=None)
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LENGTH, LEARNING_RATE = 50, 32, 32, 1e-2


class MarkovCorpus:
    """Sequences from a fixed Markov chain over ``vocab`` tokens: four successors per token."""

    PROBABILITIES = (0.6, 0.2, 0.12, 0.08)

    def __init__(self, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.stack([torch.randperm(vocab, generator=gen)[:4] for _ in range(vocab)])
        self.probabilities = torch.tensor(self.PROBABILITIES)

    def sample(self, rows: int, length: int, seed: int) -> torch.Tensor:
        """``[rows, length]`` token ids; the same ``seed`` gives the same sequences."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.empty(rows, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (rows,), generator=gen)
        choice = torch.multinomial(self.probabilities, rows * length, replacement=True, generator=gen)
        choice = choice.view(rows, length)
        for t in range(1, length):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t]]
        return ids

    @property
    def entropy(self) -> float:
        """Nats per token of the chain: no model's loss is lower (after the first token)."""
        p = self.probabilities
        return float(-(p * p.log()).sum())


def train_structured_checkpoint(out_dir: str | Path, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Train a ``STRUCTURED_CONFIG`` Llama on ``MarkovCorpus`` for ``steps`` steps (CPU, float32) and
    save it with ``save_pretrained`` into ``out_dir``. Needs ``transformers``."""
    import transformers

    # Matrices this small gain nothing from a second thread, and on a busy machine the threads'
    # synchronisation made a step twenty times slower (measured): train on one, then restore.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss = _train(transformers, steps, seed)
    finally:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    (out / "corpus.json").write_text(json.dumps({"kind": "markov", "vocab": STRUCTURED_CONFIG["vocab_size"],
                                                 "seed": seed, "steps": steps, "final_loss": loss.item()}))
    return out


def _train(transformers, steps: int, seed: int):
    torch.manual_seed(seed)
    corpus = MarkovCorpus(STRUCTURED_CONFIG["vocab_size"], seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**STRUCTURED_CONFIG)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        ids = corpus.sample(TRAIN_BATCH, TRAIN_LENGTH, seed=seed * 100_003 + step + 1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model, loss


def structured_checkpoint(root: str | Path | None = None) -> Path:
    """The trained structured model, made once and kept in ``root`` (default: the cache folder)."""
    path = Path(root or cache_dir()) / STRUCTURED_NAME
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".structured-"))
        train_structured_checkpoint(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def corpus_of(checkpoint: str | Path) -> MarkovCorpus:
    """The corpus a structured checkpoint was trained on."""
    meta = json.loads((Path(checkpoint) / "corpus.json").read_text())
    return MarkovCorpus(meta["vocab"], meta["seed"])
