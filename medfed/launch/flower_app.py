"""The Flower app definition (``[tool.flwr.app]``), generated from :class:`RunConfig` so the two never drift.

The repository has no Flower app of its own (its ``pyproject.toml`` has no ``[tool.flwr.app]``): ``medfed run``
and ``medfed server run`` write a thin app folder (just this ``pyproject.toml``) whose components import the
installed ``medfed`` package, and submit that folder with ``flwr run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tomli_w

from medfed import __version__
from medfed.config import RunConfig, from_flat, to_dict
from medfed.errors import ConfigError

SERVER_APP = "medfed.federation.server_app:app"
CLIENT_APP = "medfed.federation.client_app:app"


def app_config_table(cfg: RunConfig) -> dict[str, dict[str, object]]:
    """``[tool.flwr.app.config]`` as nested tables; Flower flattens them to ``section.key-name``."""
    return {section: {k.replace("_", "-"): v for k, v in values.items()} for section, values in to_dict(cfg).items()}


def run_config_from_app_table(table: Mapping[str, object]) -> RunConfig:
    """Inverse of :func:`app_config_table`: the ``RunConfig`` a ``[tool.flwr.app.config]`` table describes.

    Raises:
        ConfigError: a key that is not a ``section.key-name`` of this medfed's ``RunConfig``, or a bad value.
    """
    flat: dict[str, object] = {}
    for section, values in table.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"[tool.flwr.app.config] '{section}' is not a table of medfed settings")
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    return from_flat(flat)


def flower_app_pyproject(cfg: RunConfig, serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP) -> str:
    """The text of a Flower app ``pyproject.toml`` whose run config defaults are ``cfg``."""
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "medfed-app",
            "version": __version__.split("+")[0],
            "description": "medfed federated diffusion training",
            "license": "Apache-2.0",
            "dependencies": [f"medfed=={__version__}"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "medfed",
            "components": {"serverapp": serverapp, "clientapp": clientapp},
            "config": app_config_table(cfg),
        }}},
    }
    return tomli_w.dumps(doc)


def flower_app_fab(cfg: RunConfig) -> bytes:
    """The app bundle (FAB, a zip) that ``flwr run`` builds from :func:`write_flower_app`'s folder for ``cfg``:
    its ``pyproject.toml`` plus Flower's ``.info/CONTENT`` manifest. Its SHA-256 is the run's ``fab_hash``."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": flower_app_pyproject(cfg).encode()})[0]


def write_flower_app(directory: str | Path, cfg: RunConfig, serverapp: str = SERVER_APP,
                     clientapp: str = CLIENT_APP, extra_files: dict[str, str] | None = None) -> Path:
    """Write a thin Flower app folder; ``extra_files`` (relative path -> text) travel in the app bundle too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(flower_app_pyproject(cfg, serverapp, clientapp))
    for rel, text in (extra_files or {}).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_text(text)
    return directory
