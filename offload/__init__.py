"""offload: run transformer models larger than your GPU.

Weights are placed across the compute GPU's memory, pinned host RAM and the
spare memory of peer GPUs, and streamed to the compute GPU layer by layer on
side CUDA streams while earlier layers compute.

    import offload
    model = offload.load_model("path/to/checkpoint", gpu_memory="8GiB")
    print(model.plan)
    ids = model.generate([[1, 306, 4966]], max_new_tokens=32)
"""

from .api import load_model, plan_model
from .errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    InputError,
    OffloadError,
    OffloadWarning,
    PlanError,
    PlanWarning,
)
from .memory.budget import Budget, format_size, parse_size
from .memory.planner import Plan
from .offloaded_model import GenerationResult, OffloadedModel
from .models.config import ModelConfig, load_config
from .options import LoadOptions, parse_dtype
from .sampling import Sampling
from .scheduler.row_engine import RowEngine, Request

__version__ = "0.1.0"

__all__ = [
    "load_model", "plan_model", "LoadOptions", "OffloadedModel", "GenerationResult", "RowEngine", "Request",
    "Sampling", "Plan", "Budget", "ModelConfig", "load_config", "parse_size", "format_size", "parse_dtype",
    "OffloadError", "ConfigError", "CheckpointError", "BudgetError", "PlanError", "InputError", "OffloadWarning",
    "PlanWarning",
]
