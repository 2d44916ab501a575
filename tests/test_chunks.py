"""How a chunk of a pass lays out its tokens: uniform or packed, positions, and the attention masks it builds."""

import torch

from offload.models.chunks import Chunk, Rope

T, F = True, False


def rope():
    return Rope(torch.ones(2), 64, torch.float32, "cpu")


def test_a_plain_prefill_is_uniform_causal_and_needs_no_mask():
    step = Chunk.build([[1, 2, 3], [4, 5, 6]], [0, 0], "cpu")
    assert step.uniform and step.fresh and step.causal
    assert step.mask(None) is None
    assert step.tokens.shape == (2, 3) and step.kv_len == 3


def test_a_plain_decode_step_needs_no_mask_until_the_window_bites():
    step = Chunk.build([[7], [8]], [5, 5], "cpu")
    assert step.uniform and not step.fresh and not step.causal
    assert step.mask(None) is None and step.mask(8) is None  # 6 keys fit a window of 8
    windowed = step.mask(4)  # query at position 5 sees keys 2..5
    assert windowed.shape == (2, 1, 1, 6)
    assert windowed[0, 0, 0].tolist() == [F, F, T, T, T, T] == windowed[1, 0, 0].tolist()


def test_a_ragged_step_is_packed_with_a_mask_per_row():
    # row 0 holds 3 tokens and adds 2 (positions 3, 4); row 1 is new and adds 1 (position 0)
    step = Chunk.build([[1, 2], [3]], [3, 0], "cpu")
    assert not step.uniform and step.width == 2 and step.kv_len == 5
    assert step.write_rows.tolist() == [0, 0, 1] and step.write_pos.tolist() == [3, 4, 0]
    assert step.pack.tolist() == [0, 1, 2]  # flat index into [B * width]; row 1's pad is not there
    mask = step.mask(None)
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[T, T, T, T, F], [T, T, T, T, T]]
    assert mask[1, 0].tolist() == [[T, F, F, F, F], [T, F, F, F, F]]  # the pad repeats the row's last query
    assert step.mask(2)[0, 0].tolist() == [[F, F, T, T, F], [F, F, F, T, T]]


def test_rows_without_new_tokens_are_allowed():
    step = Chunk.build([[1], [], [2, 3]], [4, 0, 1], "cpu")
    assert not step.uniform and step.write_rows.tolist() == [0, 2, 2]
    assert step.last.tolist() == [0, 0, 2]  # each row's last token in the packed order (row 1's is unused)


def test_the_rotary_tables_follow_each_tokens_position():
    r = rope()
    step = Chunk.build([[1, 2], [3]], [3, 0], "cpu")
    cos, sin = step.rotary(r)
    assert torch.equal(cos[:, 0], r.cos[[3, 4, 0]]) and torch.equal(sin[:, 0], r.sin[[3, 4, 0]])


def test_decode_attention_written_out_equals_sdpa_with_grouped_heads():
    """A decode step's attention (``ops.decode_attention``) against SDPA's, per-row masks, 8 query heads on 2 kv
    heads."""
    from offload.models.chunks import DecodeChunk
    from offload.models.ops import attend, decode_attention

    hd = 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, hd, generator=gen)
    keys, values = torch.randn(3, 2, 16, hd, generator=gen), torch.randn(3, 2, 16, hd, generator=gen)
    step = DecodeChunk(torch.tensor([4, 15, 0]), 16, [Rope(torch.ones(hd // 2), 17, torch.float32, "cpu")], {None, 5})
    scale = hd**-0.5
    for window in (None, 5):
        mask = step.mask(window)
        ours = decode_attention(q, keys, values, mask, scale)
        assert torch.allclose(ours, attend(q, keys, values, mask, False, scale), atol=1e-6)
        shifted = values.clone()
        shifted[0, :, 5:] += 100  # keys past row 0's position are never read
        assert torch.allclose(decode_attention(q, keys, shifted, mask, scale)[0], ours[0])
