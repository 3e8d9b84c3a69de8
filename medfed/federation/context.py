"""What a ClientApp reads from Flower's ``Context``: the run's :class:`~medfed.config.RunConfig`, parsed once.

Every mod and handler of a message needs the run config, and a site's warm ClientApp process (deployment) or a
simulation worker serves many messages of the same run: :func:`run_config_of` parses Flower's flat run config
once per process and run, and hands every later caller the same object. :class:`RunConfig` is frozen all the way
down, so sharing it is safe; derive a changed copy with :func:`dataclasses.replace`, never mutate it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from flwr.app import Context

from medfed.config import RunConfig, from_flat

_CACHED_RUNS = 8
"""Distinct run configs one process keeps parsed (a simulation worker may serve several runs in turn)."""

_FlatKey = tuple[tuple[str, str, object], ...]


def run_config_of(context: Context) -> RunConfig:
    """The run's typed config from ``context.run_config`` (Flower's flat ``section.key-name`` form).

    Parsed by :func:`medfed.config.from_flat` the first time this process sees that run config, then cached
    (a config that does not parse is not cached: every caller gets its :class:`~medfed.errors.ConfigError`).
    """
    return _parsed(_flat_key(context.run_config))


def _flat_key(flat: Mapping[str, object]) -> _FlatKey:
    """A hashable, order-free key of the flat config. Each value's type is part of it: ``1``, ``1.0`` and
    ``True`` are equal in Python but parse differently (``True`` is no integer; ``str(1.0)`` is not ``'1'``)."""
    return tuple(sorted((key, type(value).__name__, value) for key, value in flat.items()))


@functools.lru_cache(maxsize=_CACHED_RUNS)
def _parsed(key: _FlatKey) -> RunConfig:
    return from_flat({name: value for name, _, value in key})
