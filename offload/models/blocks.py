"""Flat blocks: the named shapes of one rank's tensors, packed into one buffer of bytes.

A *block* is a unit of weights (one rank's shard of them) that lives in one
contiguous byte buffer, so that moving it between tiers is one copy: today one
decoder layer, for mixture-of-experts models also one routed expert. Its layout
is a table of named shapes, each with its dtype and byte offset; ``views(buffer)``
gives the tensors a layer computes with. The non-layer tensors (embedding, final
norm, LM head) get layouts of their own. A family (``offload/models/llama.py``...)
writes the table of its layers; :class:`BlockSpec` says which layer a block
belongs to and when it crosses its link.

Checkpoint tensors that one matrix product can serve are stored back to back
and seen as one: q, k and v as ``wqkv`` (one projection instead of three), gate
and up as ``w_gate_up``. Offsets are aligned to 256 bytes so that a tensor's
alignment, and with it the kernels the math libraries pick, is the same in every
block and every slot: an offloaded layer computes bit for bit what a resident
one does.

A compressed layer (``offload.models.quant``) stores each linear weight as its
parts (integers, scales, minimums), each a named shape of its own dtype; the
parts of a fused projection are stored part by part (q, k, v's integers back
to back, then their scales, ...), and ``views`` gives each projection as one
``QuantizedWeight`` where the dense layout gives a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..distributed import TensorParallel
from .config import ModelConfig
from .parallel import REPLICATED, Shard, vocab_rows
from .quant import QuantizedShape, QuantizedWeight, QuantScheme, StackedWeight, WeightFormat, part_shapes, scheme_for

ALIGN_BYTES = 256


@dataclass(frozen=True)
class TensorSpec:
    name: str  # field name in LayerWeights / GlobalWeights
    shape: tuple[int, ...]  # this rank's shape
    full_shape: tuple[int, ...]  # the shape of the whole tensor in the checkpoint
    source: str  # checkpoint tensor name ("{i}" stands for the layer index)
    shard: Shard  # which piece of the checkpoint tensor this rank holds
    dtype: torch.dtype
    offset: int  # in bytes, from the start of the block
    part: str = ""  # of a quantized weight: "data", "scale" or "minimum" (``quant.PARTS``); "" for a tensor
    quant: QuantScheme | None = None  # a quantized weight's format (the same for each of its parts)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


EVERY_PASS, ON_DEMAND = "every pass", "on demand"  # when a block crosses its link


@dataclass(frozen=True)
class BlockSpec:
    """One block of a model: its layout, the layer it belongs to and when it is fetched.

    A family's blocks come in this order: one ``EVERY_PASS`` block per decoder layer, in
    layer order (the layer's weights, needed by every forward pass), then, for
    mixture-of-experts models, the routed experts' blocks, fetched ``ON_DEMAND`` when a
    token is routed to them.
    """

    name: str  # "layer 3", "layer 3 expert 17"
    layout: "BlockLayout"
    layer: int
    fetch: str = EVERY_PASS
    expert: int | None = None  # a routed expert's index within its layer

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def sources(self) -> list[tuple["TensorSpec", str]]:
        return self.layout.sources(self.layer, self.expert)


class Entry(NamedTuple):
    """One named shape of a layout, as ``BlockLayout`` takes it (the last three may be left out)."""

    name: str
    full: tuple[int, ...]  # the checkpoint tensor's shape
    source: str  # its checkpoint name
    shard: Shard
    local: tuple[int, ...] | None = None  # this rank's shape, when not the shard's (vocabulary padding)
    dtype: torch.dtype | None = None  # None: the layout's dtype
    part: str = ""
    quant: QuantScheme | None = None


@dataclass(slots=True)
class GlobalWeights:
    """The tensors outside the decoder layers."""

    embed: torch.Tensor  # this rank's vocabulary rows; in host memory when the plan offloads anything
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the same tensor as ``embed`` when the checkpoint ties them


class BlockLayout:
    """Where each named tensor sits inside a flat block of ``nbytes`` bytes.

    ``groups`` names fused views: ``{"wqkv": ("wq", "wk", "wv")}`` stores those tensors
    back to back (no padding between them) and ``views`` gives them as one tensor.
    """

    def __init__(self, entries: list[tuple], dtype: torch.dtype, cls=None, groups: dict | None = None,
                 quantized: dict[str, QuantizedShape] | None = None, stacked: dict[str, tuple[str, ...]] | None = None):
        """``entries``: :class:`Entry` tuples in block order. ``quantized`` names the views made of
        a quantized weight's parts (``"wo"`` of ``"wo.data"``, ``"wo.scale"``...), with their scheme
        and shape."""
        entries = [Entry(*e) for e in entries]
        names = [e.name for e in entries]
        self.groups = {g: m for g, m in (groups or {}).items() if m[0] in names}
        self.quantized = dict(quantized or {})
        self.stacked = dict(stacked or {})  # projections whose members are stored in different formats
        follows = {m: m_prev for members in self.groups.values() for m_prev, m in zip(members, members[1:])}
        self.cls, self.specs, offset = cls, [], 0
        for e in entries:
            shape = tuple(e.local) if e.local else local_shape(e.full, e.shard)
            if e.name in follows:  # right after the previous member of its group
                assert self.specs[-1].name == follows[e.name], f"{e.name} must follow {follows[e.name]}"
                offset = self.specs[-1].offset + self.specs[-1].nbytes
            else:
                offset = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
            self.specs.append(TensorSpec(e.name, shape, tuple(e.full), e.source, e.shard, e.dtype or dtype, offset,
                                         e.part, e.quant))
            offset += self.specs[-1].nbytes
        self.nbytes = -(-offset // ALIGN_BYTES) * ALIGN_BYTES

    def signature(self) -> tuple:
        """What two layouts of blocks stored alike have in common (the tensors, their shapes, dtypes and formats):
        layers of the same signature share one layout."""
        return tuple((s.name, s.shape, s.dtype, s.quant) for s in self.specs)

    def views(self, buffer: torch.Tensor):
        """The block's tensors as views into ``buffer`` (1-D uint8, ``nbytes`` long): a ``cls``, or a dict.

        A group's members appear as the one fused view.
        """
        assert buffer.dtype == torch.uint8 and buffer.numel() == self.nbytes, "buffer does not match the layout"
        spec = {s.name: s for s in self.specs}
        view = lambda offset, nbytes, dtype, shape: buffer[offset : offset + nbytes].view(dtype).view(shape)  # noqa: E731
        members = {m for ms in self.groups.values() for m in ms}
        tensors = {s.name: view(s.offset, s.nbytes, s.dtype, s.shape) for s in self.specs if s.name not in members}
        for group, names in self.groups.items():
            first, last = spec[names[0]], spec[names[-1]]
            rows = sum(spec[n].shape[0] for n in names)
            tensors[group] = view(first.offset, last.offset + last.nbytes - first.offset, first.dtype,
                                  (rows, *first.shape[1:]))
        for name, shape in self.quantized.items():
            tensors[name] = QuantizedWeight(tensors.pop(f"{name}.data"), tensors.pop(f"{name}.scale"),
                                            tensors.pop(f"{name}.minimum", None), shape.scheme)
        for name, members in self.stacked.items():
            tensors[name] = StackedWeight([tensors.pop(m) for m in members])
        return self.cls(**tensors) if self.cls else tensors

    def sources(self, layer: int | None = None, expert: int | None = None) -> list[tuple[TensorSpec, str]]:
        """Each spec with its checkpoint tensor name (``{i}``: the layer, ``{e}``: the expert)."""
        return [(s, s.source.format(i=layer, e=expert)) for s in self.specs]


def local_shape(full: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """The shape of the piece ``shard`` of a tensor of shape ``full``."""
    if shard.dim is None:
        return tuple(full)
    return tuple(shard.stop - shard.start if d == shard.dim else n for d, n in enumerate(full))


def build_layout(entries: list, dtype: torch.dtype, cls, groups: dict, linear: tuple[str, ...],
                 fmt: WeightFormat | None, ranks: int, layer: int | None = None) -> "BlockLayout":
    """The layout of ``entries``: dense, or with each weight named in ``linear`` stored in ``fmt`` (``layer``:
    which layer's checkpoint tensors a format per tensor is looked up for)."""
    if fmt is None:
        return BlockLayout(entries, dtype, cls, groups)
    entries, groups, quantized, stacked = quantized_entries(entries, groups, linear, fmt, dtype, ranks, layer)
    return BlockLayout(entries, dtype, cls, groups, quantized, stacked)


def quantized_entries(entries: list[tuple], groups: dict[str, tuple[str, ...]], linear: tuple[str, ...],
                      fmt: WeightFormat, dtype: torch.dtype, ranks: int, layer: int | None = None):
    """A dense layer's entries with each weight named in ``linear`` replaced by its parts in ``fmt``.

    A fused projection's members go part by part: ``wq.data, wk.data, wv.data, wq.scale, ...``,
    so that each part of the projection is one view (``wqkv.data``, ``wqkv.scale``...). Where the
    members are stored in different formats (a file's own), each is a view of its own, and the
    projection is their stack. Returns (entries, fused groups, {view name: its scheme and shape},
    {stacked projection: its members}).
    """
    entries = [Entry(*e) for e in entries]
    fused_of = {m: g for g, members in groups.items() for m in members}
    schemes = {e.name: scheme_for(fmt, local_shape(e.full, e.shard)[1], e.full[1], ranks, dtype,
                                  fused_of.get(e.name, e.name), e.source.format(i=layer, e=0))
               for e in entries if e.name in linear}
    out, out_groups, quantized, stacked = [], {}, {}, {}
    for e in entries:
        if e.name not in linear:
            out.append(e)
            out_groups.update({g: m for g, m in groups.items() if m[0] == e.name})
            continue
        view = fused_of.get(e.name, e.name)
        members = [m for m in entries if m.name in groups.get(view, (e.name,))]
        if e.name != members[0].name:
            continue  # emitted with the first member
        kinds = {schemes[m.name] for m in members}
        if len(kinds) > 1:  # stored differently: each member alone, the projection their stack
            stacked[view] = tuple(m.name for m in members)
            for m in members:
                out += _stored(m, [m], m.name, schemes[m.name], dtype, quantized, out_groups)
            continue
        out += _stored(e, members, view, kinds.pop(), dtype, quantized, out_groups)
    return out, out_groups, quantized, stacked


def _stored(first: Entry, members: list[Entry], view: str, scheme: QuantScheme | None, dtype: torch.dtype,
            quantized: dict, groups: dict) -> list[Entry]:
    """The entries of ``members`` (one projection, ``view``) stored in ``scheme`` (None: dense), part by part."""
    if scheme is None:
        if len(members) > 1:
            groups[view] = tuple(m.name for m in members)
        return list(members)
    cols = local_shape(first.full, first.shard)[1]
    quantized[view] = QuantizedShape(scheme, sum(local_shape(m.full, m.shard)[0] for m in members), cols)
    parts_of = [(m, part_shapes(scheme, local_shape(m.full, m.shard)[0], cols, dtype)) for m in members]
    out = []
    for k, (part, _, _) in enumerate(parts_of[0][1]):
        for m, parts in parts_of:
            _, shape, part_dtype = parts[k]
            out.append(Entry(f"{m.name}.{part}", m.full, m.source, m.shard, shape, part_dtype, part, scheme))
        if len(members) > 1:
            groups[f"{view}.{part}"] = tuple(f"{m.name}.{part}" for m in members)
    return out


def _vocab_entry(name: str, source: str, config: ModelConfig, tp: TensorParallel):
    start, rows = vocab_rows(config, tp)
    vocab = Shard(0, start, min(start + rows, config.vocab_size)) if tp.size > 1 else REPLICATED
    return (name, (config.vocab_size, config.hidden_size), source, vocab, (rows, config.hidden_size))


def global_layout(config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                  head: WeightFormat | None = None) -> BlockLayout:
    """The non-layer tensors that stay on the compute device: the final norm and the LM head
    (which is the embedding itself when the checkpoint ties them). An untied head is stored in ``head``
    (``quant.head_format``: None, dense), unless the tensor-parallel ranks pad its rows (a vocabulary they do not
    divide)."""
    entries = [("final_norm", (config.hidden_size,), "model.norm.weight", REPLICATED)]
    if config.tie_word_embeddings:
        entries.append(_vocab_entry("embed", "model.embed_tokens.weight", config, tp))
        return BlockLayout(entries, dtype, None)
    entries.append(_vocab_entry("lm_head", "lm_head.weight", config, tp))
    if head is None or config.vocab_size % tp.size:  # every rank's head alike: none where one is padded
        return BlockLayout(entries, dtype, None)
    return build_layout(entries, dtype, None, {}, ("lm_head",), head, tp.size)


def embedding_layout(config: ModelConfig, tp: TensorParallel, dtype: torch.dtype) -> BlockLayout | None:
    """The embedding table when it is a tensor of its own (untied): a lookup needs only a step's rows
    of it, so the plan may keep it in host memory. None when tied to the LM head."""
    if config.tie_word_embeddings:
        return None
    return BlockLayout([_vocab_entry("embed", "model.embed_tokens.weight", config, tp)], dtype, None)


def checkpoint_sources(config: ModelConfig, tp: TensorParallel, dtype: torch.dtype) -> list[tuple[TensorSpec, str]]:
    """Every tensor this rank reads, with its checkpoint name (layers in the model dtype)."""
    from .registry import family_of

    family = family_of(config.architecture)
    embedding = embedding_layout(config, tp, dtype)
    specs = global_layout(config, tp, dtype).sources() + (embedding.sources() if embedding else [])
    return specs + [x for block in family.blocks(config, tp, dtype) for x in block.sources()]
