"""User-facing errors.

Anything raised as :class:`AskError` is a problem with the user's input (a path, a value, a
checkpoint). The command-line entry points print its message as one line and exit non-zero,
without a traceback. Every message names the problem and the fix.
"""


class AskError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(AskError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(AskError):
    """A dataset path, layout or split is unusable."""


class CheckpointError(AskError):
    """A checkpoint is missing, truncated, tampered with or for another model."""


class ModelError(AskError):
    """An unknown architecture or a layer name the model does not have."""


class NonFiniteLossError(AskError):
    """A loss became NaN or Inf during training."""


class RunDirectoryError(ConfigError):
    """The run directory belongs to another run: a live one, or results of other settings."""
