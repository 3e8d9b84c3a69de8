"""Errors that medfed reports to users as one line, naming the file or field at fault."""

from __future__ import annotations


class MedfedError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2 instead of a traceback."""


class ConfigError(MedfedError):
    """A configuration key or value is invalid."""


class DatasetError(MedfedError):
    """A dataset path, file or array is missing or malformed."""


class CheckpointError(MedfedError):
    """A checkpoint file is missing, corrupt or incompatible."""
