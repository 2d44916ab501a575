"""What one forward pass computes, and how its tokens are laid out.

Every row of the batch has its own KV cache row. A pass adds ``counts[b]`` new
tokens to row ``b`` after its ``starts[b]`` cached ones, so prefill, decode, a
ragged batch and a batch in which new prompts join running sequences are all
the same thing. A pass over many tokens is cut into *chunks* (``plan_chunks``)
that bound the temporaries; the decoder brings each layer in once and runs every
chunk through it.

Three layouts of a chunk's tokens:

* **uniform** (``Chunk``): every row adds the same number of tokens at the same
  position (a plain prefill). Tokens are ``[B, T]``, positions are one range, the
  cache is written with one slice and attention needs no mask; these are exactly
  the operations of the reference implementation.
* **packed** (``Chunk``): anything else with more than one token in some row. The
  linear layers see only the ``N`` real tokens ``[N, d]`` (no padding), attention
  sees them scattered into ``[B, H, T, hd]`` with a mask built once per step.
* **decode** (``DecodeChunk``): every row adds one token (or none). Every shape is
  fixed by the number of rows and a bucket of the key length, positions live in a
  device tensor, and nothing syncs with the host, so the step can be captured in
  a CUDA graph and replayed; the eager path runs the very same operations.

A step covers the contiguous cache rows ``[first_row, first_row + batch)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


class Rope:
    """cos/sin tables of the rotary embedding for positions ``[0, max_positions)``."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device: torch.device):
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)


def plan_chunks(counts: list[int], max_tokens: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Cut a pass into chunks of at most ``max_tokens`` padded tokens (rows x widest row).

    Returns ``(first_row, stop_row, [(lo, hi) per row])``: the chunk covers the rows that still
    have tokens and takes tokens ``[lo, hi)`` of each. Each row's tokens go through in order.
    """
    done, chunks = [0] * len(counts), []
    while True:
        left = [b for b, c in enumerate(counts) if done[b] < c]
        if not left:
            return chunks
        first, stop = left[0], left[-1] + 1
        width = max(max_tokens // (stop - first), 1)
        spans = [(done[b], min(counts[b], done[b] + width)) for b in range(first, stop)]
        chunks.append((first, stop, spans))
        for b, (_, hi) in zip(range(first, stop), spans):
            done[b] = hi


@dataclass
class Chunk:
    tokens: torch.Tensor  # [B, T] (uniform) or [N] (packed)
    host_tokens: torch.Tensor  # the same, in host memory (for an embedding table kept there)
    batch: int
    width: int  # T: the most tokens any row adds
    kv_len: int  # attention reads cache positions [0, kv_len)
    fresh: bool  # no row has cached tokens: attend to this step's keys directly
    start: int | None  # uniform: the common start position; packed: None
    counts: list[int]  # new tokens per row
    first_row: int = 0  # the cache row of the step's row 0
    pack: torch.Tensor | None = None  # packed: flat index into B*T of each real token
    write_rows: torch.Tensor | None = None  # packed: cache row of each token
    write_pos: torch.Tensor | None = None  # packed: cache position of each token
    last: torch.Tensor | None = None  # packed: index of each row's last token
    query_pos: torch.Tensor | None = None  # [B, T] position of each query (pads: the row's last)
    _masks: dict = field(default_factory=dict)
    _rotary: dict = field(default_factory=dict)
    attends_cache = False  # a decode step's and a verify pass's attention (to the cache alone) are computed apart

    # -------------------------------------------------------------- building

    @staticmethod
    def build(new_tokens: list[list[int]], starts: list[int], device, first_row: int = 0) -> "Chunk":
        """The step that appends ``new_tokens[b]`` to cache row ``first_row + b``, which holds ``starts[b]`` tokens."""
        counts = [len(t) for t in new_tokens]
        batch, width = len(new_tokens), max(counts)
        kv_len = max(s + c for s, c in zip(starts, counts))
        fresh = not any(starts)
        common = dict(batch=batch, width=width, kv_len=kv_len, fresh=fresh, counts=counts, first_row=first_row)
        if len(set(counts)) == 1 and len(set(starts)) == 1:
            s, host_tokens = starts[0], torch.tensor(new_tokens, dtype=torch.long)
            return Chunk(tokens=host_tokens.to(device), host_tokens=host_tokens, start=s, **common)
        rows = [b for b, c in enumerate(counts) for _ in range(c)]
        offsets = [i for c in counts for i in range(c)]
        positions = [starts[b] + i for b, i in zip(rows, offsets)]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        pos = as_long(positions)
        query_pos = [[max(s + min(t, c - 1), 0) for t in range(width)] for s, c in zip(starts, counts)]
        ends = torch.tensor(counts, dtype=torch.long).cumsum(0) - 1
        host_tokens = torch.tensor([t for row in new_tokens for t in row], dtype=torch.long)
        return Chunk(
            tokens=host_tokens.to(device), host_tokens=host_tokens, start=None, pack=as_long([b * width + i for b, i in zip(rows, offsets)]),
            write_rows=as_long([first_row + b for b in rows]), write_pos=pos, last=ends.clamp(min=0).to(device),
            query_pos=as_long(query_pos), **common,
        )

    @property
    def uniform(self) -> bool:
        return self.pack is None

    @property
    def rows(self) -> slice:
        """The cache rows this step covers."""
        return slice(self.first_row, self.first_row + self.batch)

    # -------------------------------------------------------------- layouts

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Token layout ``[..., H, hd]`` to attention layout ``[B, H, T, hd]``."""
        if self.uniform:
            return x.transpose(1, 2)
        padded = x.new_zeros(self.batch * self.width, *x.shape[1:])
        padded.index_copy_(0, self.pack, x)
        return padded.view(self.batch, self.width, *x.shape[1:]).transpose(1, 2)

    def from_heads(self, o: torch.Tensor) -> torch.Tensor:
        """Attention layout ``[B, H, T, hd]`` back to token layout ``[..., H * hd]``."""
        o = o.transpose(1, 2).reshape(self.batch, self.width, -1)
        return o if self.uniform else o.view(self.batch * self.width, -1)[self.pack]

    def last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's last new token, ``[B, d]``."""
        return h[:, -1] if self.uniform else h[self.last]

    def pads(self) -> None:
        """Which tokens are padding: none (a packed chunk holds only real tokens)."""
        return None

    def all_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Every position, ``[B, T, d]`` (zeros where a row has fewer than T new tokens)."""
        if self.uniform:
            return h
        padded = h.new_zeros(self.batch * self.width, h.shape[-1])
        padded.index_copy_(0, self.pack, h)
        return padded.view(self.batch, self.width, -1)

    # -------------------------------------------------------------- rotary embedding, cache and attention

    def rotary(self, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``rope`` at every token's position, broadcasting against ``[..., heads, head_dim]``."""
        if rope not in self._rotary:
            if self.uniform:
                at = slice(self.start, self.start + self.width)
            else:
                at = self.write_pos
            self._rotary[rope] = rope.cos[at].unsqueeze(1), rope.sin[at].unsqueeze(1)
        return self._rotary[rope]

    def store(self, cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's keys and values (token layout) into the cache."""
        if self.uniform:
            end = self.start + self.width
            cache_k[self.rows, :, self.start : end] = k.transpose(1, 2)
            cache_v[self.rows, :, self.start : end] = v.transpose(1, 2)
        else:
            cache_k[self.write_rows, :, self.write_pos] = k
            cache_v[self.write_rows, :, self.write_pos] = v

    def keys(self, cache_k, cache_v, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend to, ``[B, H_kv, L, hd]``."""
        if self.fresh or cache_k is None:
            return self.heads(k), self.heads(v)
        return cache_k[self.rows, :, : self.kv_len], cache_v[self.rows, :, : self.kv_len]

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Boolean attention mask ``[B, 1, T, L]`` (True: attend), or None when SDPA needs none."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    @property
    def causal(self) -> bool:
        """Whether SDPA's own causal mask is right (only when no explicit mask is used)."""
        return self.uniform and self.fresh and self.width > 1

    def _build_mask(self, window: int | None) -> torch.Tensor | None:
        windowed = window is not None and self.kv_len > window
        if self.uniform and not windowed and (self.fresh or self.width == 1):
            return None
        device = self.tokens.device
        if self.uniform:
            query = torch.arange(self.start, self.start + self.width, device=device).expand(self.batch, -1)
        else:
            query = self.query_pos
        key = torch.arange(self.kv_len, device=device)
        allowed = key[None, None, :] <= query[:, :, None]
        if windowed:
            allowed &= key[None, None, :] > query[:, :, None] - window
        return allowed.unsqueeze(1)


class DecodeChunk:
    """Every row of ``[0, batch)`` adds one token; shapes depend only on ``batch`` and ``kv_len``.

    ``positions[b]`` is where row b's token goes (its cached length). A row with nothing to
    add writes to the cache's *sink*, the position ``max_seq_len`` past the end, which
    attention never reads. Attention reads keys ``[0, kv_len)``, ``kv_len`` a bucket at least
    one past the largest position, masked per row. Everything is built from ``positions``
    on the device, so a captured graph recomputes it on every replay. It is used where a
    ``Chunk`` is, in the token layout ``[B, 1, d]``.
    """

    causal = False
    attends_cache = True

    def __init__(self, positions: torch.Tensor, kv_len: int, ropes, windows, tokens=None):
        self.positions, self.kv_len, self.batch = positions, kv_len, positions.shape[0]
        self.slots = positions  # where each row's key and value go
        self.rows, self.first_row, self.counts = slice(0, self.batch), 0, [1] * self.batch
        self.tokens, self.host_tokens = (None if tokens is None else tokens[:, None]), None  # [B, 1] on the device
        # [B, 1, 1, hd] against q [B, T=1, H, hd]: every table now, so that a captured graph computes them first
        self._rotary = {rope: (rope.cos[positions][:, None, None, :], rope.sin[positions][:, None, None, :])
                        for rope in ropes}
        key = torch.arange(kv_len, device=positions.device)
        self._masks = {}
        for window in windows:
            allowed = key[None, :] <= positions[:, None]
            if window is not None:
                allowed &= key[None, :] > positions[:, None] - window
            self._masks[window] = allowed[:, None, None, :]  # [B, 1, T=1, L]

    def mask(self, window: int | None) -> torch.Tensor:
        return self._masks[window]

    def rotary(self, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary[rope]

    def pads(self) -> torch.Tensor:
        """Which rows add nothing, ``[B, 1]`` on the device: theirs go to the sink, past every key read."""
        return (self.positions >= self.kv_len)[:, None]

    def with_tokens(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None) -> "DecodeChunk":
        """This chunk (its positions, tables and masks) adding ``tokens [B]``: what a replayed graph's step embeds."""
        chunk = copy.copy(self)
        chunk.tokens, chunk.host_tokens = tokens[:, None], None if host_tokens is None else host_tokens[:, None]
        return chunk

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)

    def from_heads(self, o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(self.batch, 1, -1)

    def last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1]

    def store(self, cache_k, cache_v, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys and values ``[B, 1, H_kv, hd]`` at each row's position."""
        rows = torch.arange(self.batch, device=k.device)
        cache_k[rows, :, self.positions] = k[:, 0]
        cache_v[rows, :, self.positions] = v[:, 0]

    def keys(self, cache_k, cache_v, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        return cache_k[self.rows, :, : self.kv_len], cache_v[self.rows, :, : self.kv_len]


KV_BUCKET = 128  # a decode step reads keys [0, n) for n a power of two times this (at most max_seq_len)


def bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power of two (times ``smallest``) that holds ``n``, at most ``largest``."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


def verify_bucket(width: int, largest: int) -> int:
    """The tokens a row takes in a verify pass of ``width`` captured in CUDA graphs: a power of two (each a
    bucket of captures), at most ``largest``; one token is a decode step's, as it is."""
    return width if width == 1 else bucket(width, 2, largest)
