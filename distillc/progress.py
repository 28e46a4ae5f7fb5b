"""The one progress API: passes report through a ProgressReporter and never print.

``RichProgress`` draws bars on a terminal and prints one plain line per step elsewhere (CI
logs); ``SilentProgress`` is for library use and tests.  A training loop does::

    with ctx.progress.task("distill", total=epochs, unit="epoch") as task:
        for epoch in range(epochs):
            loss, rate = train_one_epoch(epoch)
            task.advance(loss=loss, images_per_s=rate)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TaskHandle:
    """One bar: ``advance`` moves it and sets the shown fields (loss, images/s, ...).

    Fields given to an ``advance`` replace those shown before (as tqdm's ``set_postfix`` does),
    so a one-off note such as ``resumed_from`` appears once and not on every later line;
    an ``advance`` without fields keeps the previous ones.
    """

    def __init__(self, reporter: "ProgressReporter", description: str, total: int | None, unit: str):
        self._reporter = reporter
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.rich_id: Any = None

    def advance(self, steps: int = 1, **fields: Any) -> None:
        self.done += steps
        if fields:
            self.fields = dict(fields)
        self._reporter._show(self, steps)

    def summary(self) -> str:
        return format_fields(self.fields)


def format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key.replace('_', ' ')} {value}")
    return "  ".join(parts)


class ProgressReporter:
    """Interface of progress reporting; this base reports nothing."""

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "step") -> Iterator[TaskHandle]:
        yield TaskHandle(self, description, total, unit)

    def _show(self, handle: TaskHandle, steps: int) -> None:
        """Render ``handle`` after it advanced by ``steps``."""

    def log(self, message: str) -> None:
        """Show one line of information."""


class SilentProgress(ProgressReporter):
    """Shows nothing; keeps logged lines for tests to read."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def log(self, message: str) -> None:
        self.messages.append(message)


class RichProgress(ProgressReporter):
    """Rich progress bars on a terminal; a plain line per step when output is not a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self._bars: Progress | None = None

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "step") -> Iterator[TaskHandle]:
        handle = TaskHandle(self, description, total, unit)
        if not self.console.is_terminal:
            yield handle
            return
        bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
        with bars:
            handle.rich_id = bars.add_task(description, total=total, info="")
            self._bars = bars
            try:
                yield handle
            finally:
                self._bars = None

    def _show(self, handle: TaskHandle, steps: int) -> None:
        if self._bars is not None and handle.rich_id is not None:
            self._bars.update(handle.rich_id, advance=steps, info=handle.summary())
        elif steps:
            total = f"/{handle.total}" if handle.total else ""
            self.console.print(f"  {handle.description}: {handle.unit} {handle.done}{total}  {handle.summary()}",
                               highlight=False, markup=False)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)
