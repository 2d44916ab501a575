"""Bad checkpoints make ``load_model`` raise an ``OffloadError`` that names the file or tensor at fault, and the
command line refuse them in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.errors import CheckpointError, ConfigError

from hostile import AS_ROOT, refused

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def good(checkpoint_factory):
    return checkpoint_factory("errors-llama", "llama", "5.x", seed=3, **CONFIG)


@pytest.fixture
def broken(good, tmp_path):
    """A fresh copy of the good checkpoint to break."""
    hf, directory = good
    dst = tmp_path / "ckpt"
    shutil.copytree(directory, dst)
    return dst


def _load(path):
    return offload.load_model(path, dtype=torch.float32, progress=False, max_batch=1, max_seq_len=32)


def _raises(path, error, *fragments):
    with pytest.raises(error) as info:
        _load(path)
    assert isinstance(info.value, offload.OffloadError)
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    return message


def test_offload_error_is_exported():
    from offload.errors import OffloadError

    assert offload.OffloadError is OffloadError
    assert issubclass(CheckpointError, OffloadError) and issubclass(ConfigError, OffloadError)


def test_good_checkpoint_loads(good):
    hf, directory = good
    ids = torch.arange(3, 19)[None]
    with _load(directory) as model:
        with torch.no_grad():
            assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_missing_directory(tmp_path):
    _raises(tmp_path / "nowhere", ConfigError, "nowhere", "does not exist")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", ConfigError, "config.json", "empty")


def test_config_not_json(broken):
    (broken / "config.json").write_text("{ this is not json")
    _raises(broken, ConfigError, "config.json", "JSON")


def test_unknown_architecture(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["architectures"], raw["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (broken / "config.json").write_text(json.dumps(raw))
    _raises(broken, ConfigError, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def test_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _raises(broken, CheckpointError, "model.safetensors")


def test_garbage_safetensors(broken):
    file = broken / "model.safetensors"
    size = file.stat().st_size
    file.write_bytes(os.urandom(size))
    _raises(broken, CheckpointError, "model.safetensors")


def test_garbage_header_safetensors(broken):
    """A plausible header length followed by bytes that are not JSON."""
    file = broken / "model.safetensors"
    file.write_bytes((64).to_bytes(8, "little") + b"\xff" * 64 + b"\0" * 1024)
    _raises(broken, CheckpointError, "model.safetensors")


def test_no_safetensors_files(broken):
    (broken / "model.safetensors").unlink()
    _raises(broken, CheckpointError, "safetensors", str(broken))


def test_missing_tensor(broken):
    file = broken / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.v_proj.weight"
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    _raises(broken, CheckpointError, name)


def test_missing_global_tensor(broken):
    file = broken / "model.safetensors"
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    _raises(broken, CheckpointError, "lm_head.weight")


def test_wrong_shape(broken):
    file = broken / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:100].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    message = _raises(broken, CheckpointError, name, "model.safetensors")
    assert "100" in message and "128" in message


def _shard(directory, split_at="model.layers.1."):
    """Rewrite the checkpoint as two shards plus an index; returns the weight map."""
    single = directory / "model.safetensors"
    tensors = load_file(single)
    single.unlink()
    first = {k: v for k, v in tensors.items() if not k.startswith(split_at) and k != "lm_head.weight"}
    second = {k: v for k, v in tensors.items() if k not in first}
    assert first and second
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(first, directory / names[0], metadata={"format": "pt"})
    save_file(second, directory / names[1], metadata={"format": "pt"})
    weight_map = {**{k: names[0] for k in first}, **{k: names[1] for k in second}}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_checkpoint_matches_single_file(good, broken):
    _, directory = good
    _shard(broken)
    assert not (broken / "model.safetensors").exists()
    ids = torch.arange(5, 30)[None]
    with _load(directory) as single, _load(broken) as sharded:
        assert torch.equal(sharded(ids), single(ids))
        assert torch.equal(sharded.generate(ids, max_new_tokens=5, ignore_eos=True),
                           single.generate(ids, max_new_tokens=5, ignore_eos=True))


def test_sharded_checkpoint_offloaded_matches_single_file(good, broken):
    """Shards read straight into host blocks give the same logits as well."""
    _, directory = good
    _shard(broken)
    ids = torch.arange(5, 30)[None]
    with _load(directory) as single:
        expected = single(ids)
        needs = single.plan.needs
    model = offload.load_model(broken, dtype=torch.float32, progress=False, max_batch=1, max_seq_len=32,
                               gpu_memory=needs.fixed_bytes + needs.largest_block, cpu_memory="1GiB", slots=1)
    with model:
        assert model.plan.placement == ["host", "host"] and model.plan.slots == {"host": 1}
        assert torch.equal(model(ids), expected)


def test_index_lists_missing_shard(broken):
    _shard(broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    _raises(broken, CheckpointError, "model-00002-of-00002.safetensors", "model.safetensors.index.json")


def test_index_misses_a_tensor(broken):
    weight_map = _shard(broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model.norm.weight" in weight_map
    _raises(broken, CheckpointError, "model.norm.weight")


def test_index_points_to_wrong_shard(broken):
    _shard(broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    index["weight_map"][name] = "model-00002-of-00002.safetensors"  # it is in the first shard
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(broken, CheckpointError, name, "model-00002-of-00002.safetensors")


def test_index_not_json(broken):
    _shard(broken)
    (broken / "model.safetensors.index.json").write_text("not json")
    _raises(broken, CheckpointError, "model.safetensors.index.json")


@pytest.mark.parametrize("weight_map, words", [([1, 2], "weight_map must map"), (None, "weight_map must map"),
                                                ({"lm_head.weight": 5}, "not a file name"),
                                                ({"lm_head.weight": ""}, "not a file name"),
                                                ({"lm_head.weight": "../../elsewhere.safetensors"}, "not a file name"),
                                                ({"lm_head.weight": "/etc"}, "not a file name")])
def test_an_index_whose_weight_map_is_not_names_of_files_here_is_refused(broken, weight_map, words):
    _shard(broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = weight_map
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(broken, CheckpointError, "model.safetensors.index.json", words)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_json_nested_without_end_is_refused_not_a_recursion_error(broken, name):
    if name == "model.safetensors.index.json":
        _shard(broken)
    (broken / name).write_text("[" * 100_000)
    if name == "generation_config.json":  # read for the stop tokens
        from offload.chat import stop_token_ids

        with pytest.raises(ConfigError, match=name):
            stop_token_ids(broken)
        return
    _raises(broken, (ConfigError, CheckpointError), name)


def test_a_config_without_weights_needs_random_weights():
    from offload.models.shapes import shape_config

    with pytest.raises(offload.InputError, match="random_weights"):
        offload.load_model(shape_config("tiny"), progress=False)


# ---------------------------------------------------------------------- through the command line


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tiny, tmp_path, capsys):
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny, fewer)
    raw = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 4}))
    err = refused(capsys, ["--model", str(fewer), "--prompt-ids", "1", "--quiet"])
    assert "has layers up to 7, but config.json's num_hidden_layers is 4" in err


def _broken_weights(tiny: Path, tmp_path: Path, name: str, change) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def _with(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


WEIGHT_CASES = [
    pytest.param("model.layers.3.mlp.down_proj.weight", _with(float("nan")), [], "NaN or infinite", id="nan"),
    pytest.param("model.norm.weight", _with(float("inf")), [], "NaN or infinite", id="inf"),
    pytest.param("model.embed_tokens.weight", _with(1e6), ["--dtype", "fp16"], "NaN or infinite values (as float16)",
                 id="overflow-in-the-cast"),
    pytest.param("model.layers.0.self_attn.q_proj.weight", lambda t: t.to(torch.int32), [], "has dtype I32",
                 id="int32-tensor"),
    pytest.param("model.layers.5.input_layernorm.weight", lambda t: t > 0, [], "has dtype BOOL", id="bool-tensor"),
]


@pytest.mark.parametrize("name, change, flags, words", WEIGHT_CASES)
def test_bad_weights_are_refused_naming_the_tensor(tiny, tmp_path, capsys, name, change, flags, words):
    broken = _broken_weights(tiny, tmp_path, name, change)
    err = refused(capsys, ["--model", str(broken), "--prompt-ids", "1", "--quiet", *flags])
    assert words in err and name in err


def test_a_weights_file_that_is_a_pipe_is_refused_unopened(tiny, tmp_path, capsys):
    piped = tmp_path / "piped"
    piped.mkdir()
    shutil.copy(tiny / "config.json", piped / "config.json")
    os.mkfifo(piped / "model.safetensors")  # opening it would wait for a writer forever
    assert "model.safetensors: not a regular file" in refused(capsys, ["--model", str(piped), "--prompt-ids", "1"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finiteness_check_finds_a_nan_or_infinity_anywhere(dtype):
    from offload.models.checkpoint import all_finite

    t = torch.randn(3, 70001, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 12345, t.numel() - 1):
            broken = t.clone()
            broken.view(-1)[at] = bad
            assert not all_finite(broken), (bad, at)


def test_a_tensor_in_two_files_without_an_index_is_refused(tiny, tmp_path, capsys):
    """Without an index, which of two files' copies of a tensor would load is only a matter of the files' names
    (a stale shard left beside a new file): refused, naming both."""
    twice = tmp_path / "twice"
    shutil.copytree(tiny, twice)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: torch.zeros(load_file(twice / "model.safetensors")[name].shape)}, twice / "old.safetensors")
    err = refused(capsys, ["--model", str(twice), "--prompt-ids", "1", "--quiet"])
    assert repr(name) in err and "model.safetensors" in err and "old.safetensors" in err


def _saved_int8(tiny: Path, tmp_path: Path) -> Path:
    from offload.quantized import write_quantized

    return write_quantized(tiny, tmp_path / "q", "int8", dtype=torch.float32, progress=False)


def _change_tensors(directory: Path, change) -> None:
    """``change(tensors)`` applied to each safetensors file of ``directory`` (it edits the dict in place)."""
    for file in directory.glob("*.safetensors"):
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def _change_record(directory: Path, record) -> None:
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "offload_quantization": record(raw)}))


GATE = "model.layers.1.mlp.gate_proj.weight"


def _retyped(name: str, dtype):
    def retype(tensors: dict):
        if name in tensors:
            tensors[name] = tensors[name].to(dtype)

    return lambda directory: _change_tensors(directory, retype)


def _dropped(name: str):
    def change(directory: Path):
        _change_tensors(directory, lambda tensors: tensors.pop(name, None))
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return change


@pytest.mark.parametrize("change, words", [
    pytest.param(_retyped(f"{GATE}.data", torch.int32), "has dtype I32; its format keeps it as int8", id="data-int32"),
    pytest.param(_retyped(f"{GATE}.data", torch.bool), "has dtype BOOL; its format keeps it as int8", id="data-bool"),
    pytest.param(_retyped(f"{GATE}.scale", torch.bfloat16), "has dtype BF16; its format keeps it as float32",
                 id="scale-cast"),
    pytest.param(_dropped(f"{GATE}.scale"), f"no tensor '{GATE}.scale'", id="scale-missing"),
])
def test_a_saved_quantized_weights_parts_are_checked_as_stored(tiny, tmp_path, capsys, change, words):
    """A saved checkpoint's parts are read as they are, never cast: a part of another dtype (data that is not
    the format's integers, scales not in the dtype the checkpoint records) or a missing part is refused."""
    saved = _saved_int8(tiny, tmp_path)
    change(saved)
    assert words in refused(capsys, ["--model", str(saved), "--prompt-ids", "1", "--quiet"])


def test_scales_stored_otherwise_than_the_checkpoint_records_are_refused(tiny, tmp_path, capsys):
    saved = _saved_int8(tiny, tmp_path)
    _change_record(saved, lambda raw: {**raw["offload_quantization"], "dtype": "bfloat16"})
    err = refused(capsys, ["--model", str(saved), "--prompt-ids", "1", "--quiet"])
    assert "has dtype F32; its format keeps it as bfloat16" in err


@pytest.mark.parametrize("fmt, group, record, words", [
    pytest.param("int4", 32, {"group_size": 64}, "int4 in groups of 32, but config.json records int4 in groups of 64",
                 id="int4-another-group-size"),
    pytest.param("int4", 32, {"group_size": "32"}, "records int4 in groups of '32'", id="int4-group-size-not-a-number"),
    pytest.param("int4", 32, {"format": "int8", "group_size": None}, "is stored int4 in groups of 32, but config.json "
                 "records int8 per output channel", id="int4-recorded-as-int8"),
    pytest.param("int8", None, {"format": "int4", "group_size": 32}, "is stored int8 per output channel, but "
                 "config.json records int4 in groups of 32", id="int8-recorded-as-int4"),
])
def test_parts_stored_otherwise_than_the_checkpoint_records_are_refused(tiny, tmp_path, capsys, fmt, group, record,
                                                                        words):
    """scripts/quantize.py writes every layer's weights in the format and group size config.json records (the LM
    head in int8 per channel): a weight stored otherwise was not written with the rest, and was loaded as its shapes
    said, quietly. (Groups of another size also pack their nibbles otherwise: a scale tensor of another run beside
    this run's data reads other weights.)"""
    from offload.quantized import write_quantized

    saved = write_quantized(tiny, tmp_path / "q", fmt, group, "minmax", torch.float32, progress=False)
    _change_record(saved, lambda raw: {**raw["offload_quantization"], **record})
    with pytest.raises(CheckpointError, match="records"):
        _load(saved)
    assert words in refused(capsys, ["--model", str(saved), "--prompt-ids", "1", "--quiet"])


@pytest.mark.parametrize("record", ["int4", [1], {"group_size": 32, "dtype": "float32"}, {"format": "int3"},
                                    {"format": "int8"}])
def test_a_malformed_record_of_the_saved_format_is_refused(tiny, tmp_path, capsys, record):
    saved = _saved_int8(tiny, tmp_path)
    _change_record(saved, lambda raw: record)
    with pytest.raises(ConfigError, match="offload_quantization must be an object with a format"):
        _load(saved)
    assert "offload_quantization" in refused(capsys, ["--model", str(saved), "--prompt-ids", "1", "--quiet"])


def test_a_gguf_named_file_that_is_not_one_is_refused_as_such(tmp_path):
    for data in (b"", b"GGML not really"):
        (tmp_path / "model.gguf").write_bytes(data)
        _raises(tmp_path / "model.gguf", ConfigError, "model.gguf: not a GGUF file")


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_files_and_folders_that_cannot_be_read_say_so(tiny, tmp_path, capsys):
    unreadable = tmp_path / "unreadable"
    shutil.copytree(tiny, unreadable)
    os.chmod(unreadable / "model.safetensors", 0)
    try:
        err = refused(capsys, ["--model", str(unreadable), "--prompt-ids", "1", "--quiet"])
        assert "model.safetensors: cannot be read (Permission denied)" in err
    finally:
        os.chmod(unreadable / "model.safetensors", 0o644)
    for mode in (0o644, 0o311):  # no search permission: nothing in it can be looked at; no read: not listed
        os.chmod(unreadable, mode)
        try:
            err = refused(capsys, ["--model", str(unreadable), "--prompt-ids", "1", "--quiet"])
            assert "cannot be read (Permission denied)" in err, err
        finally:
            os.chmod(unreadable, 0o755)


def test_a_weights_file_given_for_its_checkpoint_says_so(tiny):
    """As the model or as its draft: the file is not read as a config."""
    weights = tiny / "model.safetensors"
    _raises(weights, ConfigError, "is neither a checkpoint directory (config.json + safetensors), a GGUF file nor")
    with pytest.raises(ConfigError, match=r"draft .*model.safetensors.* is neither a checkpoint directory"):
        offload.load_model(tiny, draft=str(weights), dtype=torch.float32, progress=False, max_seq_len=32)


# ---------------------------------------------------------------------- tensors the model would not read


def _add(directory: Path, name: str, tensor: torch.Tensor, file: str = "model.safetensors") -> None:
    tensors = load_file(directory / file)
    tensors[name] = tensor
    save_file(tensors, directory / file, metadata={"format": "pt"})


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.self_attn.q_proj.bias", (64,)),  # a bias config.json does not name (attention_bias false)
    ("model.layers.1.self_attn.q_norm.weight", (16,)),  # a Qwen3 layer's norm in a Llama
    ("score.weight", (3, 64)),  # another model's head
])
def test_a_tensor_the_model_would_not_use_is_refused_not_dropped(broken, capsys, name, shape):
    """Dropped, the tensor would leave another model's logits (transformers drops it too, as UNEXPECTED)."""
    _add(broken, name, torch.ones(shape))
    message = _raises(broken, CheckpointError, "1 tensor(s) the model would not use", name, "model.safetensors")
    assert "Traceback" not in refused(capsys, ["--model", str(broken), "--prompt-ids", "1", "--quiet"])
    assert message.count("\n") == 0


def test_rotary_frequencies_saved_by_older_checkpoints_are_not_refused(good, broken):
    """transformers, as offload, computes them from the config."""
    hf, _ = good
    _add(broken, "model.layers.1.self_attn.rotary_emb.inv_freq", torch.ones(8))
    ids = torch.arange(3, 19)[None]
    with _load(broken) as model, torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


def _tied(broken: Path, head) -> None:
    raw = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": True}))
    tensors = load_file(broken / "model.safetensors")
    tensors["lm_head.weight"] = head(tensors["model.embed_tokens.weight"])
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})


def test_a_tied_head_stored_as_a_copy_of_the_embedding_loads_tied(broken):
    _tied(broken, lambda embedding: embedding.to(torch.bfloat16).float())  # the same numbers in another dtype
    tensors = load_file(broken / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.bfloat16)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with _load(broken) as model:
        assert model.decoder.weights.lm_head is model.decoder.weights.embed


def test_a_head_that_differs_from_the_embedding_it_is_tied_to_is_refused(broken):
    """transformers 5 computes with the head (``will NOT tie them``), offload would with the embedding: the config
    says one model, the weights another."""
    _tied(broken, lambda embedding: embedding.flip(0).contiguous())
    _raises(broken, CheckpointError, "lm_head.weight that differs from model.embed_tokens.weight",
            "tie_word_embeddings")


def test_a_shard_holding_a_tensor_its_index_does_not_list_is_refused(broken):
    """transformers loads every tensor of a shard it opens: one the index leaves out would be its, not ours."""
    weight_map = _shard(broken)
    _add(broken, "model.layers.0.self_attn.q_proj.bias", torch.ones(64), weight_map["model.norm.weight"])
    _raises(broken, CheckpointError, weight_map["model.norm.weight"], "'model.layers.0.self_attn.q_proj.bias'",
            "model.safetensors.index.json does not list")


def test_a_tensor_in_two_shards_of_an_index_is_refused(broken):
    weight_map = _shard(broken)
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(file for file in set(weight_map.values()) if file != weight_map[name])
    _add(broken, name, torch.zeros(128, 64), other)
    _raises(broken, CheckpointError, repr(name), "in both", other, weight_map[name])


def test_an_index_listing_a_tensor_the_model_would_not_use_is_refused(broken):
    weight_map = _shard(broken)
    name = "model.layers.0.self_attn.q_proj.bias"
    _add(broken, name, torch.ones(64), weight_map["model.norm.weight"])
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = weight_map["model.norm.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(broken, CheckpointError, "1 tensor(s) the model would not use", name)


def test_a_single_file_beside_an_index_that_does_not_list_it_is_refused(good, broken):
    """transformers reads model.safetensors where there is one, offload the index's shards: either may be stale."""
    _, directory = good
    _shard(broken)
    shutil.copy(directory / "model.safetensors", broken / "model.safetensors")
    _raises(broken, CheckpointError, "both model.safetensors and model.safetensors.index.json", "stale")


# ---------------------------------------------------------------------- a saved quantized checkpoint's parts


UP = "model.layers.0.mlp.up_proj.weight"  # [352, 128] in the tiny shape: int4 data [352, 64]


def _reshaped(part: str, shape):
    """A change that gives ``UP``'s ``part`` (and its minimum, with its scale) the shape ``shape``."""
    def change(tensors: dict):
        for name in [f"{UP}.{part}"] + ([f"{UP}.minimum"] if part == "scale" else []):
            if name in tensors:
                tensors[name] = torch.ones(shape, dtype=tensors[name].dtype)
    return change


@pytest.mark.parametrize("fmt, part, shape", [
    pytest.param("int4", "scale", (352, 256), id="more-groups-than-columns"),  # 128 // 256: groups of nothing
    pytest.param("int4", "scale", (352, 128), id="int4-groups-of-one"),  # a byte holds two: odd groups cannot be
    pytest.param("int4", "scale", (352, 3), id="groups-that-do-not-divide"),
    pytest.param("int4", "scale", (352,), id="int4-a-scale-a-row"),
    pytest.param("int4", "data", (352 * 64,), id="int4-data-not-a-matrix"),
    pytest.param("int8", "data", (352 * 128,), id="int8-data-not-a-matrix"),
    pytest.param("int8", "scale", (352, 8, 1), id="int8-scales-of-three-dimensions"),
])
def test_parts_whose_shapes_are_no_quantized_weight_are_refused_naming_them(tiny, tmp_path, capsys, fmt, part, shape):
    """The format of a saved weight is read from its parts' shapes; shapes that are none (a ZeroDivisionError, or
    an error in the first product, before) are refused before any weights are read."""
    from offload.quantized import write_quantized

    saved = write_quantized(tiny, tmp_path / "q", fmt, 32 if fmt == "int4" else None, "minmax", torch.float32,
                            progress=False)  # (minmax: the parts' shapes matter here, not their rounding)
    _change_tensors(saved, _reshaped(part, shape))
    with pytest.raises(CheckpointError, match=rf"{UP}.scale has shape .*which is no {fmt} grouping of {UP}.data"):
        _load(saved)
    assert f"{UP}.scale" in refused(capsys, ["--model", str(saved), "--prompt-ids", "1", "--quiet"])


def test_parts_without_the_record_of_their_format_are_refused(tiny, tmp_path):
    """config.json without ``offload_quantization`` describes a dense model: its weights are not read dense from
    their parts quietly (the LM head of tensor-parallel ranks that pad the vocabulary is, under the record)."""
    saved = _saved_int8(tiny, tmp_path)
    _change_record(saved, lambda raw: None)
    _raises(saved, CheckpointError, "as quantized parts", "records no offload_quantization")


def test_the_quantize_script_refuses_what_loading_refuses(tiny, tmp_path, capsys):
    """A checkpoint load_model refuses (here a tensor the model would not use, a tensor of another shape) is not
    written quantized either, as a checkpoint that would load without it."""
    from offload.quantized import write_quantized

    extra = tmp_path / "extra"
    shutil.copytree(tiny, extra)
    _add(extra, "model.layers.0.self_attn.q_proj.bias", torch.ones(128))
    with pytest.raises(CheckpointError, match="would not use"):
        write_quantized(extra, tmp_path / "q", "int4", progress=False)
    narrow = _broken_weights(tiny, tmp_path, UP, lambda t: t[:300].contiguous())
    with pytest.raises(CheckpointError, match=rf"{UP}' has shape \[300, 128\], expected \[352, 128\]"):
        write_quantized(narrow, tmp_path / "q", "int8", progress=False)
    assert not (tmp_path / "q").exists()


def test_a_nan_in_a_weight_read_dense_from_its_parts_is_a_checkpoint_error(tiny, tmp_path):
    """A saved int8 LM head read dense (as tensor-parallel ranks that pad the vocabulary read it) is checked for NaN as
    every other tensor is."""
    from offload.models.blocks import TensorSpec
    from offload.models.checkpoint import CheckpointSource
    from offload.models.parallel import REPLICATED

    saved = _saved_int8(tiny, tmp_path)

    def poison(tensors: dict):
        if "lm_head.weight.scale" in tensors:
            tensors["lm_head.weight.scale"][3] = float("nan")

    _change_tensors(saved, poison)
    source = CheckpointSource(saved)
    rows, cols = source.shape("lm_head.weight.data")
    spec = TensorSpec("lm_head.weight", (rows, cols), (rows, cols), "lm_head.weight", REPLICATED, torch.float32, 0)
    with pytest.raises(CheckpointError, match="'lm_head.weight' holds NaN or infinite values"):
        source.read(spec, "lm_head.weight", torch.empty(rows, cols))
    source.close()
