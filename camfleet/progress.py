"""A progress bar for long CLI operations that run their work in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Often enough to look live, rarely enough to cost nothing next to the work.
POLL_S = 0.2


def run_with_progress(
    work: Callable[[], T], total: int, done: Callable[[], int], description: str
) -> T:
    """Run `work()` in a thread while a rich progress bar shows `done()` of `total`.

    On a terminal the bar is live; in a pipe or a log file rich prints nothing extra.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            progress.update(task, completed=done())
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
