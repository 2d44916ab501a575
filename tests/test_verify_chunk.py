"""A verify pass (``OffloadedModel.verify`` over a ``VerifyChunk``): every row padded to one width, the logits of
every new token, and rows rolled back by their caller."""

import pytest
import torch

import offload
from offload.models.chunks import Rope
from offload.models.verify_chunk import VerifyChunk
from offload.offloaded_model import _tree_layout

T, F = True, False

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [list(range(3, 15)), list(range(40, 47)), [5, 9, 2]]


@pytest.fixture(scope="module")
def model(tiny):
    model = offload.load_model(tiny, dtype=torch.float32, max_batch=4, max_seq_len=64, progress=False)
    yield model
    model.close()


def test_pads_go_to_the_sink_and_every_query_sees_its_row_up_to_itself():
    positions = torch.tensor([[3, 4, 5], [0, 9, 9]])  # row 1 adds one token; 9 is the sink of a cache of 9
    chunk = VerifyChunk(torch.zeros(2, 3, dtype=torch.long), None, positions, 6,
                        [Rope(torch.ones(2), 10, torch.float32, "cpu")], [None, 2])
    mask = chunk.mask(None)
    assert mask.shape == (2, 1, 3, 6)
    assert mask[0, 0].tolist() == [[T, T, T, T, F, F], [T, T, T, T, T, F], [T] * 6]
    assert mask[1, 0, 0].tolist() == [T, F, F, F, F, F]
    assert chunk.mask(2)[0, 0, 1].tolist() == [F, F, F, T, T, F]  # a window of 2 at position 4
    k = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).view(2, 3, 1, 2)
    cache_k, cache_v = torch.zeros(2, 1, 10, 2), torch.zeros(2, 1, 10, 2)
    chunk.store(cache_k, cache_v, k, k)
    assert torch.equal(cache_k[0, 0, 3:6], k[0, :, 0]) and torch.equal(cache_k[1, 0, 0], k[1, 0, 0])
    assert cache_k[1, 0, 1:9].abs().sum() == 0  # row 1's pads went to the sink


def test_verify_gives_the_logits_of_every_new_token(model):
    """Rows at different positions adding 4, 4 and 2 tokens (padded to 4), and a row adding none: the logits of
    each new token equal those of one full forward pass over the row."""
    full = [model([p])[0] for p in PROMPTS]
    keep = [len(PROMPTS[0]) - 4, len(PROMPTS[1]) - 4, 1]
    model.extend([p[:k] for p, k in zip(PROMPTS, keep)] + [[7]], keep[:0] + [0, 0, 0, 0])
    logits = model.verify([p[k:] for p, k in zip(PROMPTS, keep)] + [[]], keep + [1])
    assert logits.shape == (4, 4, model.config.vocab_size)
    for b, (p, k) in enumerate(zip(PROMPTS, keep)):
        assert torch.allclose(logits[b, : len(p) - k], full[b][k:], atol=1e-5)


def test_a_rolled_back_row_overwrites_its_rejected_tokens(model):
    """Verify five drafted tokens, keep two of them (the row's cached length goes back), verify others: the logits
    are those of the row that never saw the rejected ones."""
    prompt, drafts, others = PROMPTS[0], [101, 102, 103, 104, 105], [201, 202, 203]
    model.extend([prompt], [0])
    model.verify([[7] + drafts], [len(prompt)])
    cached = len(prompt) + 1 + 2  # the last token and two drafts accepted
    logits = model.verify([others], [cached])
    want = model([prompt + [7] + drafts[:2] + others])[0, cached:]
    assert torch.allclose(logits[0], want, atol=1e-5)


def test_a_one_token_verify_is_a_decode_step(model):
    model.extend([PROMPTS[1]], [0])
    logits = model.verify([[7]], [len(PROMPTS[1])])
    assert logits.shape == (1, 1, model.config.vocab_size)
    assert torch.allclose(logits[0, 0], model([PROMPTS[1] + [7]])[0, -1], atol=1e-5)


def test_a_verify_pass_may_be_wider_than_its_rows(model):
    """The speculator asks for K + 1 tokens a row whatever the draft found: the extra positions are pads."""
    model.extend([PROMPTS[2]], [0])
    logits = model.verify([[7, 8]], [len(PROMPTS[2])], width=5)
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.allclose(logits[0, :2], model([PROMPTS[2] + [7, 8]])[0, -2:], atol=1e-5)


def test_verify_checks_its_rows(model):
    with pytest.raises(offload.InputError, match="max_seq_len"):
        model.verify([[1, 2, 3]], [62])
    with pytest.raises(offload.InputError, match="at least one new token"):
        model.verify([[], []], [0, 0])
    with pytest.raises(offload.InputError, match="max_batch=4"):
        model.verify([[1]] * 5, [0] * 5)
    with pytest.raises(offload.InputError, match="width must be"):
        model.verify([[1, 2, 3]], [0], width=2)


@pytest.mark.parametrize("key", ["qwen3-window", "gemma3", "gemma3-softcap"])
def test_verify_in_families_with_sliding_windows(checkpoint_factory, key):
    """Drafted tokens past a sliding window see only the window (Qwen3's and Gemma 3's tiny checkpoints)."""
    from test_families import MODELS, _make

    _, directory = _make(checkpoint_factory, key)
    vocab = MODELS[key][1]["vocab_size"]
    ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(3)).tolist()
    with offload.load_model(directory, dtype=torch.float32, max_batch=2, max_seq_len=64, progress=False) as model:
        full = model(ids)
        model.extend([ids[0][:14], ids[1][:9]], [0, 0])
        logits = model.verify([ids[0][14:], ids[1][9:12]], [14, 9])
        assert torch.allclose(logits[0], full[0, 14:], atol=1e-5)
        assert torch.allclose(logits[1, :3], full[1, 9:12], atol=1e-5)


# ---------------------------------------------------------------------- trees

TREE_TOKENS = [7, 11, 12, 13, 21, 22, 31]  # the root (the row's last token), then drafts
TREE_PARENTS = [0, 0, 0, 1, 1, 4]  # 11, 12, 13 follow the root; 21, 22 follow 11; 31 follows 21


def _path(i: int) -> list[int]:
    """Token i of the tree and its ancestors, root first."""
    path = [i]
    while path[0]:
        path.insert(0, TREE_PARENTS[path[0] - 1])
    return path


def test_a_tree_mask_sees_the_cache_and_each_tokens_ancestors():
    slots = torch.tensor([[3, 4, 5, 6, 9]])  # cached 3 tokens; 4 tree tokens; a pad at the sink 9
    positions = torch.tensor([[3, 4, 4, 5, 9]])  # two tokens at depth 1, one at depth 2 under token 1
    ancestors = torch.tensor([[[T, F, F, F, F], [T, T, F, F, F], [T, F, T, F, F], [T, T, F, T, F], [F, F, F, F, T]]])
    chunk = VerifyChunk(torch.zeros(1, 5, dtype=torch.long), None, positions, 8,
                        [Rope(torch.ones(2), 10, torch.float32, "cpu")], [None, 2], slots, ancestors)
    mask = chunk.mask(None)[0, 0]
    assert mask[2].tolist() == [T, T, T, T, F, T, F, F]  # token 2: the cache, the root and itself, not token 1
    assert mask[3].tolist() == [T, T, T, T, T, F, T, F]
    # a window of 2 at position 5 (token 3) sees positions 4 and 5: token 1 (slot 4) and itself (slot 6)
    assert chunk.mask(2)[0, 0, 3].tolist() == [F, F, F, F, T, F, T, F]
    k = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 1, 2)
    cache_k = torch.zeros(1, 1, 10, 2)
    chunk.store(cache_k, cache_k.clone(), k, k)
    assert torch.equal(cache_k[0, 0, 3:7], k[0, :4, 0])  # tokens go to their slots, whatever their depth


def test_a_tree_is_laid_out_by_depth_and_ancestors():
    """``verify``'s layout of a tree row (root, two children of the root, a grandchild under token 1, a pad) and
    of a padded row: rotary positions by depth, each token seeing its ancestors and itself."""
    positions, ancestors = _tree_layout([[0, 0, 1], []], [[3, 4, 5, 6, 9], [9] * 5], 9)
    assert positions.tolist() == [[3, 4, 4, 5, 9], [9] * 5]
    assert ancestors[0].tolist() == [[T, F, F, F, F], [T, T, F, F, F], [T, F, T, F, F], [T, T, F, T, F],
                                     [F, F, F, F, T]]
    assert torch.equal(ancestors[1], torch.eye(5, dtype=torch.bool))


def test_every_branch_of_a_tree_gets_the_logits_of_its_own_chain(model):
    """A tree of drafts beside a plain row: each token's logits are those of the row that took the path to it,
    and after keep_path the row continues from the branch kept as if it had never seen the others."""
    prompt = PROMPTS[0]
    model.extend([prompt, PROMPTS[1]], [0, 0])
    logits = model.verify([TREE_TOKENS, [5, 6]], [len(prompt), len(PROMPTS[1])], width=len(TREE_TOKENS),
                          parents=[TREE_PARENTS, [0]])
    for i in range(len(TREE_TOKENS)):
        want = model([prompt + [TREE_TOKENS[j] for j in _path(i)]])[0, -1]
        assert torch.allclose(logits[0, i], want, atol=1e-5), i
    assert torch.allclose(logits[1, :2], model([PROMPTS[1] + [5, 6]])[0, -2:], atol=1e-5)
    kept = _path(6)  # root, 11, 21, 31
    model.keep_path([len(prompt), len(PROMPTS[1])], [kept, [0, 1]])
    branch = prompt + [TREE_TOKENS[j] for j in kept]
    after = model.verify([[40, 41]], [len(branch)])
    assert torch.allclose(after[0], model([branch + [40, 41]])[0, -2:], atol=1e-5)


def test_verify_checks_its_trees(model):
    with pytest.raises(offload.InputError, match="parents"):
        model.verify([[1, 2, 3]], [0], parents=[[0, 2]])  # token 2 cannot follow itself
    with pytest.raises(offload.InputError, match="parents"):
        model.verify([[1, 2, 3]], [0], parents=[[0]])
    with pytest.raises(offload.InputError, match="rows of parents"):
        model.verify([[1, 2]], [0], parents=[[0], [0]])


@pytest.mark.parametrize("key", ["qwen3-window", "gemma3"])
def test_a_tree_in_families_with_sliding_windows(checkpoint_factory, key):
    """A tree whose branches reach past a sliding window: each token sees the window of its own path."""
    from test_families import MODELS, _make

    _, directory = _make(checkpoint_factory, key)
    vocab = MODELS[key][1]["vocab_size"]
    prompt = torch.randint(3, vocab, (14,), generator=torch.Generator().manual_seed(4)).tolist()
    tokens = [t % vocab for t in TREE_TOKENS]
    with offload.load_model(directory, dtype=torch.float32, max_batch=1, max_seq_len=64, progress=False) as model:
        model.extend([prompt], [0])
        logits = model.verify([tokens], [len(prompt)], parents=[TREE_PARENTS])
        for i in range(len(tokens)):
            want = model([prompt + [tokens[j] for j in _path(i)]])[0, -1]
            assert torch.allclose(logits[0, i], want, atol=1e-5), i
