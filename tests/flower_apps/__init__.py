"""ClientApp wrappers shipped into Flower app bundles by tests (see ``app_files``)."""

from pathlib import Path


def app_files(*modules: str) -> dict[str, str]:
    """``extra_files`` for ``run_simulation``: the named wrapper modules as package ``medfed_test_apps``."""
    here = Path(__file__).parent
    files = {"medfed_test_apps/__init__.py": ""}
    for module in modules:
        files[f"medfed_test_apps/{module}.py"] = (here / f"{module}.py").read_text()
    return files
