"""Progress bars for long work (Rich, which Flower already depends on)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; draws a bar with counts and ETA on stderr when ``enabled``.

    Extra keyword fields (e.g. ``loss=0.12``) are shown after the bar.
    """
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: object) -> None:
            status = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"status": status} if fields else {}))

        yield advance
