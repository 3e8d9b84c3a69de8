"""Errors that medfed reports to users as one line, naming the file, option or field at fault."""

from __future__ import annotations


class MedfedError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2 instead of a traceback."""


class ConfigError(MedfedError):
    """A configuration key, option or value is invalid.

    ``key`` is the flat config key at fault (``section.key-name``) when there is one, so a caller that knows where
    the value came from (a command-line option, ``--set``, a ``--config`` file) can say so.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DatasetError(MedfedError):
    """A dataset path, file or array is missing or malformed."""


class CheckpointError(MedfedError):
    """A checkpoint file is missing, corrupt or incompatible."""


def require(ok: bool, what: str, message: str) -> None:
    """Raise ``ConfigError("<what> <message>")`` unless ``ok``: the one-line check of a command-line option.

    Example: ``require(num > 0, f"--num {num}:", "must be > 0")``.
    """
    if not ok:
        raise ConfigError(f"{what} {message}")
