"""Quiet start-up and crash logs of the ``medfed`` command.

Third-party messages that say nothing a user can act on are filtered once at start-up, not per file; an
unexpected exception's traceback goes to a log file (``$MEDFED_LOG_DIR``, else ``~/.cache/medfed/logs``) and the
screen gets one line naming it.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from pathlib import Path

NOISY_LOGGERS = ("monai.data.nvimgcodec_pydicom_plugin",)
"""Loggers silenced below ERROR: MONAI's ``nvImageCodec is not available`` warning, printed once per DICOM read
on machines without nvImageCodec (the reader falls back to pydicom's own decoders, which is what medfed wants)."""

NOISY_WARNINGS = (
    r".*nvImageCodec.*",
    r"Secure RNG turned off.*",
    r"Using a non-full backward hook.*",
    r"Optimal order is the (largest|smallest) alpha.*",
)
"""Warning messages (regular expressions) filtered at start-up: they describe library internals, not the run."""


def quiet_third_party() -> None:
    """Silence :data:`NOISY_LOGGERS` and :data:`NOISY_WARNINGS` for this process (idempotent)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def clock(wall: float) -> str:
    """``wall`` (seconds since the epoch, ``time.time()``) as local ``HH:MM:SS.ss``: lines up server and site
    logs of one machine."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f"{wall % 1:.2f}"[1:]


def log_dir() -> Path:
    """``$MEDFED_LOG_DIR``, else ``$XDG_CACHE_HOME/medfed/logs`` (default ``~/.cache/medfed/logs``)."""
    if os.environ.get("MEDFED_LOG_DIR"):
        return Path(os.environ["MEDFED_LOG_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "medfed" / "logs"


def write_crash_log(err: BaseException, command: list[str]) -> Path:
    """Write ``err``'s full traceback and the command line to a new file in :func:`log_dir` (0600).

    Returns:
        The log file, ``<YYYYmmdd-HHMMSS>-<pid>.log``.

    Raises:
        OSError: the folder or file cannot be written.
    """
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"command: {' '.join(command)}\n\n" + "".join(traceback.format_exception(err))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
