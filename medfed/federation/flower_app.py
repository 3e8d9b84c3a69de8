"""The Flower app definition (``[tool.flwr.app]``), generated from :class:`RunConfig` so the two never drift.

The repository's own ``pyproject.toml`` carries the same table for ``flwr run .``; ``medfed run`` writes a thin
app folder (just this ``pyproject.toml``) whose components import the installed ``medfed`` package.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from medfed import __version__
from medfed.config import RunConfig, to_dict

SERVER_APP = "medfed.federation.server_app:app"
CLIENT_APP = "medfed.federation.client_app:app"


def app_config_table(cfg: RunConfig) -> dict[str, dict[str, object]]:
    """``[tool.flwr.app.config]`` as nested tables; Flower flattens them to ``section.key-name``."""
    return {section: {k.replace("_", "-"): v for k, v in values.items()} for section, values in to_dict(cfg).items()}


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
