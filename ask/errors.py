"""User-facing errors.

Anything raised as :class:`AskError` is a problem with the user's input (a path, a value, a
checkpoint). The command-line entry points print its message as one line and exit non-zero,
without a traceback. Every message names the problem and the fix.
"""

import errno
import os


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


class DependencyError(AskError):
    """A package ask needs is missing, or two installed builds clash."""


class NonFiniteLossError(AskError):
    """A loss became NaN or Inf during training."""


class RunDirectoryError(ConfigError):
    """The run directory belongs to another run: a live one, or results of other settings."""


def require_named_layers(who: str, model: object) -> None:
    """Raise :class:`ModelError` unless ``model`` has ask's ``forward_features(x, layers)``.

    A plain ``nn.Module`` has none; a timm model has ``forward_features(x)``, one argument with
    another meaning, which would fail later with a TypeError. Either is told to use ``ask.wrap``.
    """
    import inspect

    method = getattr(model, "forward_features", None)
    takes_layers = callable(method)
    if takes_layers:
        try:
            parameters = list(inspect.signature(method).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: trust it
            parameters = None
        if parameters is not None:
            takes_layers = len(parameters) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if not takes_layers:
        raise ModelError(
            f"{who} needs a model whose hidden layers are named; {type(model).__name__} is a plain module: "
            "wrap it first, model = ask.wrap(model, layers=[...], mean=[...], std=[...])"
        )


# What the operating system said, as the cause and the fix a user can act on. Raised by a write or
# a read anywhere (a checkpoint, metrics.json, the run lock, a report), so the console scripts
# translate them in one place rather than at every call site.
_OS_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device holding '{path}'",
                   "free some space or point hydra.run.dir (or ASK_CACHE_DIR) at another disk"),
    errno.EDQUOT: ("the disk quota is exhausted for '{path}'",
                   "free some space or point hydra.run.dir (or ASK_CACHE_DIR) at another disk"),
    errno.EISDIR: ("'{path}' is a folder where ask writes a file", "move or remove that folder"),
    errno.ENOTDIR: ("'{path}' is not a folder (a file stands where a folder is needed)",
                    "move that file away or choose another path"),
    errno.EEXIST: ("'{path}' is a file where ask needs a folder", "move that file away or choose another path"),
    errno.ELOOP: ("'{path}' is a loop of symbolic links", "point the link at a real file or folder"),
    errno.EACCES: ("permission denied on '{path}'", "fix its permissions or choose another path"),
    errno.EPERM: ("operation not permitted on '{path}'", "fix its permissions or choose another path"),
    errno.EROFS: ("'{path}' is on a read-only file system", "choose a writable path"),
}


def os_error_message(error: OSError) -> str | None:
    """One line naming the path, the cause and the fix of ``error``, or None for other OS errors.

    For a rename the destination (``filename2``) is the path the user knows; the source is a
    temporary file.
    """
    problem = _OS_PROBLEMS.get(error.errno)  # type: ignore[arg-type]
    path = error.filename2 if error.filename2 is not None else error.filename
    if problem is None or path is None:
        return None
    cause, fix = problem
    return f"{cause.format(path=os.fsdecode(path))}; {fix}"
