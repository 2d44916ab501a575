"""The Python API: every class of bad argument to ``plan_model``, ``load_model``, ``model.step`` and
``model.generate`` raises offload's own error (an ``InputError`` for bad input), naming it. ``tiny_model`` has
2 rows of 32 tokens."""

from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.errors import InputError, OffloadError

BETA = pytest.mark.filterwarnings("ignore:.*(beta|prototype):UserWarning")  # PyTorch's words on sparse CSR and nested

API_CASES = [
    pytest.param(lambda m: m.extend([[5000]], [0]), "outside the vocabulary", id="step-token-outside-vocabulary"),
    pytest.param(lambda m: m.extend([[1]], [-1]), "cached must be a count", id="step-negative-cached"),
    pytest.param(lambda m: m.extend([[1.0]], [0]), "list of integers", id="step-float-token"),
    pytest.param(lambda m: m.extend(5, [0]), "one list of token ids per", id="step-not-a-list"),
    pytest.param(lambda m: m.extend([None], [0]), "one list of token ids per", id="step-row-none"),
    pytest.param(lambda m: m.extend(torch.tensor([[1, 2]]), [0]), "one list of token ids per", id="step-tensor"),
    pytest.param(lambda m: m.extend([[1]], 0), "cached must be a list", id="step-cached-not-a-list"),
    pytest.param(lambda m: m.extend([[1]], [30 + 5]), "grow past max_seq_len", id="step-past-the-cache"),
    pytest.param(lambda m: m.generate(torch.tensor([[1.5, 2.0]])), "must hold integers", id="float-input-ids"),
    pytest.param(lambda m: m.generate(torch.tensor([[True]])), "must hold integers", id="bool-input-ids"),
    pytest.param(lambda m: m.generate([[1.0, 2.0]]), "must be integers", id="float-ids-in-lists"),
    pytest.param(lambda m: m.generate("hello"), "shape [batch, seq]", id="text-as-input-ids"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens="5"), "max_new_tokens must be", id="max-new-tokens-str"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens=True), "max_new_tokens must be", id="max-new-tokens-bool"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens=[2, 3]), "2 max_new_tokens values for 1",
                 id="max-new-tokens-per-row-mismatch"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=float("nan")), "temperature",
                 id="temperature-nan"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, seed=2**64), "seed", id="seed-past-64-bits"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=10**400), "temperature",
                 id="temperature-400-digits"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=1e-320), "beyond float32",
                 id="temperature-underflows"),
    pytest.param(lambda m: m.generate([[1]], do_sample="yes"), "do_sample", id="do-sample-string"),
    pytest.param(lambda m: m.generate([[1]], ignore_eos="no"), "ignore_eos must be True or False",
                 id="ignore-eos-string"),
    pytest.param(lambda m: m.generate([[1]], return_result=1), "return_result must be True or False",
                 id="return-result-number"),
    pytest.param(lambda m: m.generate([[1]], eos_token_id="2"), "eos_token_id must be", id="eos-string"),
    pytest.param(lambda m: m.generate([[1]], eos_token_id=2.0), "eos_token_id must be", id="eos-float"),
    pytest.param(lambda m: m.generate([[1]], eos_token_id=[2, 10**6]), "eos_token_id must be a token id (0 to",
                 id="eos-past-the-vocabulary"),
    pytest.param(lambda m: m.generate([[1], [2], [3]]), "max_batch=2", id="more-prompts-than-rows"),
    pytest.param(lambda m: m([[-1]]), "outside the vocabulary", id="forward-negative-id"),
    pytest.param(lambda m: m.generate([]), "no prompts given", id="no-prompts"),
    pytest.param(lambda m: m.generate([[1, 2], 3]), "row 1: expected a list", id="row-not-a-list"),
    pytest.param(lambda m: m.generate([[1, 2]], attention_mask=[[1]]), "one 0 or 1 per token", id="mask-short"),
    pytest.param(lambda m: m.generate([[1, 2]], attention_mask="garbage"), "one 0 or 1 per token",
                 id="mask-garbage-for-lists"),
    pytest.param(lambda m: m.generate([[1, 2]], attention_mask=[[1, 2]]), "only 0 and 1", id="mask-not-0-or-1"),
    pytest.param(lambda m: m.generate(torch.empty(1, 2, dtype=torch.long, device="meta")), "without data",
                 id="meta-tensor"),
    pytest.param(lambda m: m.generate(torch.tensor([[1, 2]]).to_sparse()), "must be a dense tensor",
                 id="sparse-tensor"),
    pytest.param(lambda m: m(torch.tensor([[1, 2]]).to_sparse_csr()), "must be a dense tensor",
                 id="forward-sparse-csr-tensor", marks=BETA),
    pytest.param(lambda m: m.generate(torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])),
                 "must be a dense tensor", id="nested-tensor", marks=BETA),
    pytest.param(lambda m: m.generate([[1, 2]], attention_mask=torch.tensor([[1, 1]]).to_sparse()),
                 "attention_mask must be a dense tensor", id="sparse-mask-for-lists"),
    pytest.param(lambda m: m.verify([[1, 2]], [0], width=4096), "the plan reserves memory for",
                 id="verify-wider-than-reserved"),
    pytest.param(lambda m: m.verify([[1, 2]], [0], parents=5), "parents must be a list", id="verify-parents-int"),
    pytest.param(lambda m: m.verify([[1, 2]], [0], parents=[None]), "parents must be a list",
                 id="verify-parents-none"),
    pytest.param(lambda m: m.keep_path([0], [[5, 100]]), "within max_seq_len", id="keep-path-past-the-cache"),
    pytest.param(lambda m: m.keep_path([0], [[1, 0]]), "a path is indices", id="keep-path-backwards"),
    pytest.param(lambda m: m.keep_path([0], 5), "one cached length and one path", id="keep-path-not-lists"),
    pytest.param(lambda m: m.generate([[1]], max_length=5), "unknown argument of generate 'max_length'",
                 id="generate-unknown-keyword"),
    pytest.param(lambda m: m.generate([[1]], max_new_token=5), "(did you mean 'max_new_tokens'?)",
                 id="generate-misspelt-keyword"),
    pytest.param(lambda m: m([[1]], foo=1), "unknown argument of the model's call 'foo'", id="call-unknown-keyword"),
    pytest.param(lambda m: m.options.replace(max_bach=2), "unknown option 'max_bach' (did you mean 'max_batch'?)",
                 id="options-replace-unknown"),
]


@pytest.mark.parametrize("call, words", API_CASES)
def test_bad_api_arguments_raise_input_error(tiny_model, call, words):
    with pytest.raises(InputError) as info:
        call(tiny_model)
    assert words in str(info.value)


LOAD_CASES = [
    pytest.param(dict(max_batch="2"), "max_batch must be a positive integer", id="max-batch-string"),
    pytest.param(dict(slots=-1), "slots must be a positive integer", id="slots-negative"),
    pytest.param(dict(device="foo"), "unknown device", id="device-unknown"),
    pytest.param(dict(device="meta"), "not supported", id="device-meta"),
    pytest.param(dict(foo=1), "unknown option 'foo'", id="option-unknown"),
    pytest.param(dict(rounding="minmax"), "rounding='minmax' is for int4 weights", id="rounding-without-int4"),
    pytest.param(dict(rounding="minmax", quantize="int8"), "rounding='minmax' is for int4", id="rounding-int8"),
    pytest.param(dict(gpu_mem="1GiB"), "did you mean 'gpu_memory'", id="option-misspelt"),
    pytest.param(dict(options=5), "options must be a LoadOptions", id="options-wrong-type"),
    pytest.param(dict(gpu_memory=float("nan")), "expected a size", id="budget-nan"),
    pytest.param(dict(gpu_memory=float("inf")), "expected a size", id="budget-inf"),
    pytest.param(dict(gpu_memory=10**400), "more bytes than any machine has", id="budget-huge-int"),
    pytest.param(dict(cpu_memory="9" * 400), "more bytes than any machine has", id="budget-400-digits"),
    pytest.param(dict(peer_memory=5), "peer memory", id="peer-memory-number"),
    pytest.param(dict(peer_memory=[5]), "peer memory", id="peer-memory-list-of-numbers"),
    pytest.param(dict(peer_memory={"meta": "100MiB"}), "meta is not a GPU", id="peer-memory-meta"),
    pytest.param(dict(link_bandwidth={"host": -1}), "link_bandwidth", id="bandwidth-negative"),
    pytest.param(dict(link_bandwidth={"hots": 1e9}), "link_bandwidth names no link 'hots'", id="bandwidth-misspelt"),
    pytest.param(dict(link_bandwidth={1: 1e9}), "link_bandwidth names no link 1", id="bandwidth-not-a-name"),
    pytest.param(dict(link_bandwidth={"cuda": 1e9}), "names no link 'cuda'", id="bandwidth-device-without-index"),
    pytest.param(dict(link_bandwidth={"cuda:\uff11": 1e9}), "names no link", id="bandwidth-device-full-width"),
    pytest.param(dict(dtype=torch.int8), "unsupported dtype", id="dtype-integer"),
    pytest.param(dict(tp=2), "torchrun", id="tp-without-torchrun"),
    pytest.param(dict(gpu_memory={-1: "1GiB"}), "unknown device -1", id="budget-device-negative"),
    pytest.param(dict(gpu_memory={"\u00b2": "1GiB"}), "unknown device", id="budget-device-superscript"),
    pytest.param(dict(gpu_memory={True: "1GiB"}), "unknown device True", id="budget-device-bool"),
    pytest.param(dict(peer_memory={-1: "1GiB"}), "unknown device -1", id="peer-device-negative"),
]


@pytest.mark.parametrize("kwargs, words", LOAD_CASES)
def test_bad_load_arguments_raise_offload_error(bare, kwargs, words):
    with pytest.raises(OffloadError) as info:
        offload.plan_model(bare, **kwargs)
    assert words in str(info.value)


def test_random_weights_must_be_a_seed(bare):
    with pytest.raises(InputError, match="random_weights must be an integer seed"):
        offload.load_model(json.loads((bare / "config.json").read_text()), random_weights="x", progress=False)


def test_rows_that_finish_early_do_not_overrun_the_cache(tiny_model):
    result = tiny_model.generate([[1, 2, 3], [4]], max_new_tokens=[1, 28], ignore_eos=True, return_result=True)
    assert [len(t) for t in result.tokens] == [1, 28]


def test_progress_must_be_a_flag(bare):
    with pytest.raises(InputError, match="progress must be True or False"):
        offload.load_model(bare, progress="no")


def test_an_attention_mask_drops_the_padding_of_list_rows_as_of_a_tensor(tiny_model):
    padded, mask = [[0, 0, 5, 6], [7, 8, 9, 10]], [[0, 0, 1, 1], [1, 1, 1, 1]]
    kw = dict(max_new_tokens=4, ignore_eos=True, return_result=True)
    as_lists = tiny_model.generate(padded, attention_mask=mask, **kw).tokens
    as_tensor = tiny_model.generate(torch.tensor(padded), attention_mask=torch.tensor(mask), **kw).tokens
    assert as_lists == as_tensor == tiny_model.generate([[5, 6], [7, 8, 9, 10]], **kw).tokens


def test_threads_sharing_a_model_take_turns(tiny_model):
    """Four threads generating at once get what each would alone (the model has one KV cache: calls queue)."""
    import threading

    prompts = [[[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]], [[10]]]
    alone = [tiny_model.generate(p, max_new_tokens=6, ignore_eos=True) for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = tiny_model.generate(prompts[i], max_new_tokens=6, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def test_a_closed_model_lets_its_memory_go_and_refuses_to_run(tiny):
    model = offload.load_model(tiny, max_batch=1, max_seq_len=16, progress=False)
    with model:
        model.generate([[1, 2]], max_new_tokens=2)
    assert model.closed and model.pool is None and model.cache is None and model.decoder is None
    for call in (lambda: model.generate([[1, 2]]), lambda: model([[1, 2]]), lambda: model.extend([[1]], [0])):
        with pytest.raises(InputError, match="this model is closed"):
            call()
    model.close()  # again: nothing to do



def test_masked_logits_are_each_rows_own_whatever_the_padding(tiny_model):
    """A row's logits go to its tokens' places (zeros elsewhere): in place where some row has no padding (the plan
    reserves one tensor of logits), into a new tensor where every row has some; masks with holes too."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for mask in ([[1, 1, 1, 1], [0, 1, 0, 1]], [[0, 1, 1, 0], [1, 0, 0, 1]], [[1, 1, 1, 1], [1, 1, 0, 0]]):
        mask = torch.tensor(mask)
        out = tiny_model(ids, attention_mask=mask)
        assert out.shape == (2, 4, tiny_model.config.vocab_size)
        for b in range(2):
            keep = mask[b].bool()
            alone = tiny_model(ids[b][keep][None])[0]
            assert (out[b][keep] - alone).abs().max() <= 1e-5 and not out[b][~keep].any(), (mask, b)
