"""The package's own error types.

Every error a user can cause by bad input (a missing file, a corrupt checkpoint,
an unparsable budget, a model that fits nowhere) is an ``OffloadError``, so a
caller can catch one type and the CLI can print one line instead of a traceback.
"""


class OffloadError(Exception):
    """Base class of every error caused by bad input or an impossible request."""


class ConfigError(OffloadError):
    """A model config that is missing, unreadable, or of an unsupported architecture."""


class CheckpointError(OffloadError):
    """A checkpoint file that is missing, truncated, corrupt, or lacks a tensor."""


class BudgetError(OffloadError):
    """A memory budget that cannot be parsed or names an unknown device."""


class PlanError(OffloadError):
    """A model that fits no combination of the given memory budgets."""


class InputError(OffloadError):
    """Bad prompts, token ids or generation arguments."""


class OffloadWarning(UserWarning):
    """A plan that works but is probably not what the user wants."""


class PlanWarning(OffloadWarning):
    """One of the plan's own warnings (printed with the plan, so the command line shows it there only)."""
