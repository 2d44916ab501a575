"""The layout of a verify pass: every row adds the same number of tokens, at its own position.

Speculative decoding checks a row's drafted tokens in one pass over the target:
row ``b`` adds its last token and its drafted ones, ``width`` tokens in all, after
its ``positions[b, 0]`` cached ones, and the pass returns the logits of every one of
them. A :class:`VerifyChunk` is a :class:`~offload.models.chunks.DecodeChunk` that
is ``width`` tokens wide: every shape depends only on the number of rows, the width
and the bucket of the key length, positions live in a device tensor and rows are
padded (a row with fewer tokens, or none, writes its pads to the cache's *sink*, the
position past the end that attention never reads), so a verify pass can be captured
in a CUDA graph like a decode step. Tokens are ``[B, W]``; attention is masked per
query (``key <= query position``), so a drafted token sees the cache and the tokens
before it in its row, and a pad sees nothing that matters.

A row's tokens may also form a *tree* (``ancestors``): token 0 is the root (the row's
last token), every other token has a parent among the tokens before it, and several
may share a depth, so they cannot share the cache's positions. Token ``i`` is then
written to *slot* ``slots[b, i]`` (the cache index ``cached + i``) while its rotary
position is ``positions[b, i]`` (``cached`` plus its depth), and it attends to the
row's cached tokens and to the slots of its ancestors and itself. A chain is the tree
whose every token is the parent of the next: slots equal positions, and the mask is
the one above.
"""

from __future__ import annotations

import copy

import torch


class VerifyChunk:
    """Rows ``[0, batch)`` each add ``width`` tokens; token ``i`` of row ``b`` is at rotary position
    ``positions[b, i]`` and goes to cache slot ``slots[b, i]`` (the same, for a chain)."""

    causal = False
    attends_cache = True

    def __init__(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None, positions: torch.Tensor, kv_len: int,
                 ropes, windows, slots: torch.Tensor | None = None, ancestors: torch.Tensor | None = None):
        """``positions [B, W]``: each token's rotary position; ``slots [B, W]``: where its key and value go
        (default: its position); ``ancestors [B, W, W]``: token ``i`` attends to token ``j`` of its row (a tree;
        default: ``j <= i``, a chain). A pad's slot is the sink."""
        self.tokens, self.host_tokens, self.positions, self.kv_len = tokens, host_tokens, positions, kv_len
        self.slots = positions if slots is None else slots
        self.batch, self.width = positions.shape
        self.rows, self.first_row, self.counts = slice(0, self.batch), 0, [self.width] * self.batch
        # [B, W, 1, hd] against q [B, W, H, hd]
        self._rotary = {rope: (rope.cos[positions][:, :, None, :], rope.sin[positions][:, :, None, :])
                        for rope in ropes}
        key = torch.arange(kv_len, device=positions.device)
        if ancestors is None:
            allowed, key_positions = key[None, None, :] <= positions[:, :, None], key[None, None, :]
        else:
            allowed, key_positions = _tree_mask(key, self.slots, positions, ancestors)
        self._masks = {}
        for window in windows:
            mask = allowed if window is None else allowed & (key_positions > positions[:, :, None] - window)
            self._masks[window] = mask[:, None]  # [B, 1, W, L]

    def mask(self, window: int | None) -> torch.Tensor:
        return self._masks[window]

    def pads(self) -> torch.Tensor:
        """Which tokens are padding, ``[B, W]`` on the device: theirs go to the sink, past every key read."""
        return self.slots >= self.kv_len

    def with_tokens(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None) -> "VerifyChunk":
        """This chunk (its positions, tables and masks) adding ``tokens [B, W]``: what a replayed graph's pass
        embeds."""
        chunk = copy.copy(self)
        chunk.tokens, chunk.host_tokens = tokens, host_tokens
        return chunk

    def rotary(self, rope) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary[rope]

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Token layout ``[B, W, H, hd]`` to attention layout ``[B, H, W, hd]``."""
        return x.transpose(1, 2)

    def from_heads(self, o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(self.batch, self.width, -1)

    def last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1]

    def all_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Every position ``[B, W, d]``: the logits of every drafted token are what a verify pass is for."""
        return h

    def store(self, cache_k, cache_v, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys and values ``[B, W, H_kv, hd]`` at each token's slot (pads: at the sink)."""
        rows = torch.arange(self.batch, device=k.device)[:, None]
        cache_k[rows, :, self.slots] = k
        cache_v[rows, :, self.slots] = v

    def keys(self, cache_k, cache_v, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        return cache_k[self.rows, :, : self.kv_len], cache_v[self.rows, :, : self.kv_len]


def _tree_mask(key: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, ancestors: torch.Tensor):
    """What each token of a tree may attend to, ``[B, W, L]``: the row's cached keys (the slots before its root's)
    and its ancestors' slots; and the rotary position of every key, ``[B, 1, L]`` (for sliding windows). A row's
    token ``j`` sits at slot ``root + j``, so key ``l`` is token ``l - root`` of the tree where that is in
    ``[0, W)``; nothing larger than the mask itself is built."""
    batch, width = slots.shape
    root = slots[:, :1]  # [B, 1]; the sink for a row with no tokens, past every key
    in_tree = (key[None, :] >= root) & (key[None, :] < root + width)  # [B, L]
    token = (key[None, :] - root).clamp(0, width - 1)  # [B, L]: the tree token at each key (where in_tree)
    tree = ancestors.gather(2, token[:, None, :].expand(batch, width, -1)) & in_tree[:, None, :]
    cached = key[None, None, :] < root[:, :, None]
    key_positions = torch.where(in_tree, positions.gather(1, token), key[None, :])
    return cached | tree, key_positions[:, None, :]
