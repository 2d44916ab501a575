"""Sampling as a user meets it: the distribution ``generate`` draws from, and what sampling leaves alone.

The distribution is checked end to end on the structured model (whose next-token distributions have clear
favourites) against ``transformers``' own temperature, top-k and top-p warpers, by a chi-square test over
seeded draws: row ``b`` of a batch draws with the seed ``seed + b``, so one call gives many independent draws.
"""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import offload
from offload.sampling import Sampling, probabilities

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 64  # draws per call of generate
PROMPT = [7, 12, 30]


@pytest.fixture(scope="module")
def model(structured):
    model = offload.load_model(structured, max_batch=ROWS, max_seq_len=8, progress=False)
    yield model
    model.close()


def test_a_top_p_of_one_keeps_every_token_of_a_large_vocabulary():
    """top_p=1 (the default) filters nothing. A float32 running sum of 128k probabilities passes 1 before the
    last tokens, and the nucleus rule used to drop those tokens: a tenth of the vocabulary, here."""
    logits = 3 * torch.randn(4, 128_256, generator=torch.Generator().manual_seed(0))
    assert (probabilities(logits, [Sampling(do_sample=True)] * 4) > 0).all()
    # (and a top_p below 1 still filters)
    assert (probabilities(logits, [Sampling(do_sample=True, top_p=0.9)] * 4) == 0).any()


def test_unseeded_sampling_leaves_the_callers_random_numbers_alone(model):
    """Without a seed a row's generator takes a fresh seed of its own: the global generator, which the caller
    may have seeded for its own work, is neither reseeded nor drawn from."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    model.generate([PROMPT], max_new_tokens=3, do_sample=True)
    assert torch.equal(torch.rand(4), expected)
    a, b = (Sampling(do_sample=True).generator("cpu") for _ in range(2))
    assert a.initial_seed() != b.initial_seed()


def _expected(structured, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' distribution of the next token after PROMPT under these settings."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(structured).float().eval()
    with torch.no_grad():
        x = hf(torch.tensor([PROMPT])).logits[:, -1]
    x = TemperatureLogitsWarper(temperature)(None, x)
    x = TopKLogitsWarper(top_k)(None, x) if top_k else x
    x = TopPLogitsWarper(top_p)(None, x) if top_p < 1 else x
    return x.softmax(-1)[0].double()


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of ``counts`` against ``expected`` probabilities, cells expecting fewer than 5 pooled."""
    n, live = counts.sum(), expected > 0
    assert counts[~live].sum() == 0, "a token the filters leave out was drawn"
    big, small = expected * n >= 5, live & (expected * n < 5)
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    wanted = torch.cat([expected[big], expected[small].sum()[None]]) * n
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    stat = ((observed - wanted) ** 2 / wanted).sum()
    dof = len(wanted) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 0, 0.8), (2.0, 10, 0.9)])
def test_sampled_tokens_follow_the_models_filtered_distribution(model, structured, temperature, top_k, top_p):
    counts = torch.zeros(model.config.vocab_size, dtype=torch.double)
    for call in range(40):
        result = model.generate([PROMPT] * ROWS, max_new_tokens=1, do_sample=True, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=call * ROWS, return_result=True)
        counts += torch.bincount(torch.tensor([t[0] for t in result.tokens]), minlength=len(counts))
    assert _chi_square_p(counts, _expected(structured, temperature, top_k, top_p)) > 1e-3
