"""The public verbs: ``plan_model`` and ``load_model``.

    model = offload.load_model("path/to/llama", gpu_memory="8GiB", cpu_memory="64GiB")
    print(model.plan)
    out = model.generate(input_ids, max_new_tokens=32)

Both take the model and either a :class:`LoadOptions` or its fields as keywords
(or both: the keywords override). The plan decides each layer's tier before a
byte is read, the pool allocates each tier once, the weights are read straight
into their final place, and the layer stream moves the streamed ones into slots
while the model runs.
"""

from __future__ import annotations

import warnings

from .drafts import COPIES, INT4, draft_kind, draft_label, make_draft
from .errors import CheckpointError, InputError, PlanWarning
from .inputs import check_flags
from .loading import Setup, load_weights, prepare, weight_source
from .memory.planner import Plan
from .memory.pool import WeightPool
from .models.quant import FORMATS
from .offloaded_model import OffloadedModel
from .options import LoadOptions


def plan_model(model, options: LoadOptions | None = None, **kwargs) -> Plan:
    """The placement plan :func:`load_model` would follow, computed without reading any weights.

    Takes the same model and options as :func:`load_model` (not ``random_weights`` or
    ``progress``: it reads no weights). Under tensor parallelism each
    rank gets its own plan; ``plan.title`` says whose. The plan's warnings are issued
    as :class:`PlanWarning` (an :class:`OffloadWarning`; and printed with the plan).
    """
    setup = prepare(model, _options(options, kwargs))
    _warn(setup)
    return setup.plan


def load_model(model, options: LoadOptions | None = None, *, random_weights: int | None = None,
               progress: bool = True, **kwargs) -> OffloadedModel:
    """Load a model with its layers spread over GPU memory, pinned host memory and peer GPUs.

    Args:
        model: a checkpoint directory (HF ``config.json`` plus safetensors, single file or
            sharded), a GGUF file (its layers kept in their compressed formats; on a CPU expanded once where
            they fit in half the budget, unless ``quantize="stored"``), or a
            ``ModelConfig`` / config dict together with ``random_weights``.
        options: a :class:`LoadOptions`; its fields may also be given as keywords:
            ``device``, ``dtype``, ``gpu_memory`` (a size such as ``"20GiB"``, or an
            accelerate-style ``max_memory`` dict), ``cpu_memory``, ``peer_memory``,
            ``max_batch``, ``max_seq_len``, ``max_step_tokens``, ``tp``, ``slots``,
            ``link_bandwidth``, ``quantize`` (``"int8"``, ``"int4"``, or ``"stored"``), ``group_size``.
            See :class:`LoadOptions` for each.
        random_weights: a seed: fill the weights with seeded random numbers instead of reading files; with
            ``quantize`` (int8, int4) the quantized weights are made in their packed form (random integers,
            a scale giving them the dense numbers' spread), not dense numbers quantized: seconds, not minutes,
            for a 70b model (an int4 or int8 draft of such a target is refused: it would be unrelated).
        progress: show a progress bar while loading (rank 0 only).

    Raises:
        OffloadError: a missing or corrupt checkpoint, an unknown architecture, a budget that
            cannot be parsed, or a model that fits none of the budgets.
    """
    if random_weights is not None and (not isinstance(random_weights, int) or isinstance(random_weights, bool)):
        raise InputError(f"random_weights must be an integer seed, got {random_weights!r}")
    check_flags(progress=progress)
    options = _options(options, kwargs)
    packed = random_weights is not None and options.quantize in FORMATS
    if packed and draft_kind(options.draft) in COPIES:  # before the plan may decline it
        raise InputError(f"an {draft_kind(options.draft)} draft of random weights quantized at load would be "
                         "unrelated to them (they are made packed): give the target in 16 bits, or a draft model")
    setup = prepare(model, options)
    _warn(setup)
    pool = load_weights(setup, weight_source(model, random_weights, setup.device, packed=packed,
                                             requantize=setup.requantize),
                        progress and setup.tp.rank == 0)
    try:
        draft = _load_draft(setup, model, random_weights, progress, pool)
    except BaseException:
        pool.close()
        raise
    return OffloadedModel(setup, pool, draft)


def _load_draft(setup: Setup, model, random_weights: int | None, progress: bool, pool: WeightPool):
    """The draft the plan kept (``offload.drafts``): prompt lookup, or a draft model read now: the target's own
    checkpoint (or random weights) quantized to int4 or int8, which shares the target's final norm, LM head and
    embedding (in ``pool``), or the draft checkpoint."""
    kind = draft_kind(setup.options.draft)
    if setup.draft is None:
        return make_draft(kind)
    copy = kind in COPIES
    try:
        draft_pool = load_weights(setup.draft, weight_source(model if copy else setup.options.draft,
                                                             random_weights if copy else None, setup.device,
                                                             requantize=setup.draft.requantize),
                                  progress and setup.tp.rank == 0, shared_globals=pool if copy else None)
    except CheckpointError as e:
        raise CheckpointError(f"draft {setup.options.draft}: {e}") from None
    return make_draft(kind, OffloadedModel(setup.draft, draft_pool), draft_label(setup.options.draft),
                      setup.options.max_batch)


def _options(options: LoadOptions | None, kwargs: dict) -> LoadOptions:
    if options is not None and not isinstance(options, LoadOptions):
        raise InputError(f"options must be a LoadOptions, got {options!r}")
    options = (options or LoadOptions()).replace(**kwargs) if kwargs else options or LoadOptions()
    if options.rounding != "search" and INT4 not in (options.quantize, draft_kind(options.draft)):
        raise InputError(f"rounding={options.rounding!r} is for int4 weights (quantize='int4' or draft='int4'); "
                         "nothing here is rounded to int4")
    return options


def _warn(setup: Setup) -> None:
    if setup.tp.rank == 0:
        context = setup.config.context_warning(setup.options.max_seq_len)
        for message in [*setup.plan.warnings, *([context] if context else [])]:
            warnings.warn(message, PlanWarning, stacklevel=3)
