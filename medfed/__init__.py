"""medfed: federated, differentially private diffusion models for hospitals.

Areas are subpackages of this one package (``medfed.datasets``, ``medfed.privacy``, ``medfed.evaluation``,
``medfed.clinician_review``, ...): a top-level ``datasets`` package would shadow Hugging Face ``datasets``, and a
single importable package keeps Flower app bundles self-contained.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medfed")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
