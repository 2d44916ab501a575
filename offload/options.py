"""How a model is loaded, as one value: :class:`LoadOptions`.

Budgets, the KV cache's shape, the dtype, the device, tensor parallelism and the
streaming slots travel together from the API or the command line through
planning and loading, and nothing along the way changes them (FlexGen's
``Policy`` plays the same part). A caller that wants another value makes a new
one with :meth:`LoadOptions.replace`.

Also here: the one place that reads dtype names, and the cache folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .drafts import COPIES, draft_kind
from .errors import InputError
from .inputs import check_keywords, is_real
from .models.quant import check_request
from .speculative import MAX_BRANCHES, MAX_DRAFT_TOKENS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_device(value) -> torch.device:
    """``torch.device`` from ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: one this machine has, or an :class:`InputError`."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {value!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {device} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device} was asked for, but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices visible)")
    return device


def parse_dtype(value, device: torch.device | str | None = None) -> torch.dtype:
    """``torch.bfloat16`` from ``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``...; None: bfloat16 on a GPU, else float32."""
    if value is None:
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise InputError(f"unsupported dtype {value!r}; use one of float32, bfloat16, float16")


def cache_dir() -> Path:
    """Where measured link bandwidths and the demo checkpoint are kept: ``$OFFLOAD_CACHE_DIR`` or ``~/.cache/offload``."""
    return Path(os.environ.get("OFFLOAD_CACHE_DIR") or Path.home() / ".cache" / "offload")


@dataclass(frozen=True)
class LoadOptions:
    """Everything :func:`offload.load_model` and :func:`offload.plan_model` take besides the model.

    Attributes:
        device: the compute device; default ``cuda:LOCAL_RANK`` when CUDA is present, else ``cpu``.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` (or a ``torch.dtype``);
            default bfloat16 on a GPU, float32 on a CPU.
        gpu_memory: budget of the compute device, e.g. ``"20GiB"``; or a whole
            accelerate-style ``max_memory`` dict ``{0: "20GiB", "cuda:1": "40GiB", "cpu": "100GiB"}``.
            Default: its free memory less 2 GiB (on a CPU: 80% of available RAM).
        cpu_memory: pinned host memory for streamed layers. Default with a GPU: 80% of available RAM; on a
            CPU: 0 (nothing streams unless given).
        peer_memory: other GPUs' memory, ``{"cuda:1": "40GiB"}`` or ``["cuda:1=40GiB"]``. Under
            tensor parallelism the peers are dealt out to the ranks in turn.
        max_batch, max_seq_len: the KV cache is reserved for this many rows of this many tokens
            (default max_seq_len: the model's context, at most 2048).
        max_step_tokens: the most (padded) tokens one chunk of a forward pass holds; a pass over
            more (long prompts, many rows) runs them through each layer in several chunks, and the
            plan reserves the temporaries of one. Default: the largest of 2048, 1024, ... 128 (at
            most ``max_batch x max_seq_len``) whose temporaries cost no resident layer, or 128 where none does.
        all_logits: whether ``model(input_ids)`` may return the logits of every position: the plan
            then reserves them for a whole chunk (``max_step_tokens x vocabulary``). False: only
            what generation reads (each row's last position), a far smaller reserve for large
            vocabularies; the server and batch jobs load so. Default True.
        tp: tensor-parallel ranks; needs one process per rank (``torchrun --nproc-per-node tp``).
        slots: block-sized buffers per streaming link that its layers are copied into (default 2).
        link_bandwidth: bytes/s per link (``{"host": 55e9, "hbm": 4e12, "cuda:1": 390e9}``, and
            ``"matmul"`` FLOP/s) instead of measuring them; a name that is no link is refused.
        cuda_graphs: capture decode steps in CUDA graphs and replay them (on a GPU; default True). A
            mixture of experts whose experts are copied captures each layer up to its routing as a
            piece, and the host's part runs between the pieces.
        compile: compile the decode layer with ``torch.compile`` before capturing it (with
            ``cuda_graphs``; default off). With offload's kernels in every 16-bit step it gains
            nothing measurable (docs/benchmarks.md), and inductor tunes kernels by timing them, so two separately compiled models (a resident
            and an offloaded one) need not give the same bits; compiling takes seconds per bucket
            of rows and key length.
        prefetch_experts: a mixture of experts whose experts stream guesses each next routed layer's
            experts by that layer's router (where its block is resident) applied to the current
            hidden state, and copies them ahead (``offload/scheduler/experts.py``); default off.
            Results are unchanged; a wrong guess costs link time.
        direct_experts: a mixture of experts' decode steps and verify passes (up to 64 tokens) read each
            routed expert where it lives, HBM or pinned host memory, inside their kernels
            (``offload/models/expert_kernels.py``): the routing never goes to the host, so a step is
            captured as a dense model's, and a streamed expert crosses its link once per pass without a
            copy. Experts in the model's dtype, int8 or int4 (groups of a power of two from 16), on the
            device or the host (not on peers); prefills, and passes of more tokens, still copy. None (the
            default): where every expert stays on one GPU, in CUDA graphs (qwen3-30b-a3b on an H100: 5.9
            against 26.7 ms a step copying); where experts stream, copying measured faster (74.3 against
            83.2 ms at 8 GiB). Either way the logits are the same: on a GPU copies run the same kernels.
        quantize: ``"int8"`` or ``"int4"``: the decoder layers' linear weights are quantized while
            loading and stay compressed in every tier (``offload.models.quant``); None (default):
            the model dtype, or a checkpoint stored quantized (a GGUF file, ``scripts/quantize.py``'s)
            in its own formats, except that a CPU expands a GGUF file's once at load where they fit in
            half the budget (a CPU multiplies dense weights faster); ``"stored"``: a GGUF file's own
            formats on a CPU too.
        group_size: int4's input columns per scale; default 128, or where 128 does not divide a
            weight's input dimension the largest smaller power of two that does.
        rounding: how int4 groups are rounded: ``"search"`` (default: each group's scale and minimum
            chosen to minimise its squared error) or ``"minmax"`` (the group's range).
        draft: speculative decoding (``offload.drafts``): ``"ngram"`` (prompt lookup: drafts copied from
            earlier matches in the prompt and the output; no model, no memory), ``"int4"`` or ``"int8"`` (a
            copy of the target's own weights quantized to int4 or int8 and kept on the compute device; the plan
            keeps it only where it predicts a gain, and says so; int8 takes twice the memory and is accepted
            more often), or the path of a smaller checkpoint with the same vocabulary
            (kept on the compute device; its weights and KV cache come out of ``gpu_memory``). Each
            pass over the target then checks a row's drafted tokens at once. None (default): no draft.
        draft_tokens: tokens drafted per row and pass (at most 64); None (default): chosen before each
            pass from the rows' measured acceptance and the plan's cost of a pass (at most 16).
        draft_branches: with a draft model, the tokens it proposes at each depth: its
            likeliest, and ``draft_branches - 1`` alternatives beside it, verified as a tree in the same
            pass (at most 4; 1: a chain). None (default): chosen before each pass, like ``draft_tokens``,
            from how often the row's token was among the draft's alternatives where a chain broke.
        tree_width: set by offload on a draft model (``offload.drafts.draft_options``): the widest pass
            of its own that it runs, growing a tree of drafts (its CUDA graphs and their memory are
            planned for it). Leave it at 1.
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    gpu_memory: object = None
    cpu_memory: object = None
    peer_memory: object = None
    max_batch: int = 1
    max_seq_len: int | None = None
    max_step_tokens: int | None = None
    all_logits: bool = True
    tp: int = 1
    slots: int | None = None
    link_bandwidth: Mapping[str, float] | None = None
    cuda_graphs: bool = True
    compile: bool = False
    prefetch_experts: bool = False
    direct_experts: bool | None = None
    quantize: str | None = None
    group_size: int | None = None
    rounding: str = "search"
    draft: str | os.PathLike | None = None
    draft_tokens: int | None = None
    draft_branches: int | None = None
    tree_width: int = 1

    def __post_init__(self):
        check_request(self.quantize, self.group_size, self.rounding, draft_kind(self.draft) in COPIES)
        _check_draft(self.draft, self.draft_tokens)
        _check_branches(self.draft, self.draft_branches)
        _count("tree_width", self.tree_width)
        if self.tree_width > MAX_DRAFT_TOKENS + 1:
            raise InputError(f"tree_width must be at most {MAX_DRAFT_TOKENS + 1}, got {self.tree_width}")
        for name in ("cuda_graphs", "compile", "all_logits", "prefetch_experts"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.direct_experts is None or isinstance(self.direct_experts, bool)):
            raise InputError(f"direct_experts must be True, False or None (where every expert fits on one GPU), got "
                             f"{self.direct_experts!r}")
        if self.prefetch_experts and self.direct_experts:
            raise InputError("prefetch_experts and direct_experts do not go together (a prefetch fills the cache, "
                             "which direct reads do not use): choose one")
        _count("max_batch", self.max_batch)
        _count("tp", self.tp)
        for name in ("max_seq_len", "max_step_tokens", "slots"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name))
        if self.link_bandwidth is not None:
            if not isinstance(self.link_bandwidth, Mapping):
                raise InputError(f"link_bandwidth must be a dict of bytes/s per link, got {self.link_bandwidth!r}")
            for link, bw in self.link_bandwidth.items():
                _check_link(link)
                if not is_real(bw) or bw <= 0:
                    raise InputError(f"link_bandwidth[{link!r}] must be a positive number of bytes/s, got {bw!r}")

    def replace(self, **changes) -> "LoadOptions":
        """A copy with ``changes`` (this one is left as it is)."""
        check_keywords(changes, [f.name for f in dataclasses.fields(self)], "option",
                       "see offload.LoadOptions for the options")
        return dataclasses.replace(self, **changes)


MAX_COUNT = 2**31 - 1  # rows, tokens and ranks are indexed with 32-bit integers


def _check_branches(draft, branches) -> None:
    if branches is None:
        return
    if draft is None:
        raise InputError("draft_branches goes with a draft model (draft='int4', 'int8' or a checkpoint's path): "
                         "no draft was given")
    if isinstance(draft, str) and draft.strip().lower() == "ngram":
        raise InputError("draft_branches goes with a draft model (draft='int4', 'int8' or a checkpoint's path): "
                         "prompt lookup proposes no alternatives")
    _count("draft_branches", branches)
    if branches > MAX_BRANCHES:
        raise InputError(f"draft_branches must be at most {MAX_BRANCHES}, got {branches}")


def _check_draft(draft, draft_tokens) -> None:
    if draft is not None and not isinstance(draft, (str, os.PathLike)):
        raise InputError(f"draft must be 'ngram', 'int4', 'int8' or the path of a checkpoint, got {draft!r}")
    if isinstance(draft, str) and not draft.strip():
        raise InputError("draft is empty; give 'ngram', 'int4', 'int8' or the path of a checkpoint")
    if draft_tokens is None:
        return
    if draft is None:
        raise InputError("draft_tokens goes with a draft (draft='ngram', 'int4', 'int8' or a checkpoint's path)")
    _count("draft_tokens", draft_tokens)
    if draft_tokens > MAX_DRAFT_TOKENS:
        raise InputError(f"draft_tokens must be at most {MAX_DRAFT_TOKENS}, got {draft_tokens}")


def _check_link(link) -> None:
    """A rate's name: one the planner reads, or a peer's device as budgets name it ("cuda:1"); a misspelt one (or
    "cuda", which no peer is named) would be ignored."""
    from .memory.bandwidth import RATES  # (it imports this module)

    if not (isinstance(link, str) and (link in RATES or re.fullmatch(r"(cuda|cpu):\d+", link, re.ASCII))):
        raise InputError(f"link_bandwidth names no link {link!r}: give {', '.join(RATES[:3])}, a peer device such as "
                         f"'cuda:1', or a kernel's rate ({', '.join(RATES[3:])})")


def _count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_COUNT:
        raise InputError(f"{name} must be at most {MAX_COUNT}, got {value}")
