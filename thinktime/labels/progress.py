"""A live progress bar for labelling: chains done, ETA, the share of steps labelled right, tokens and speed."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class LabelProgress:
    """Counts the chains already in the folder (a resume starts part-way) and each new batch."""

    def __init__(self, total: int, earlier: list[dict], console: Console):
        self.steps = sum(len(r["labels"]) for r in earlier)
        self.right = sum(sum(r["labels"]) for r in earlier)
        self.tokens = 0
        self.started = time.perf_counter()
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]label[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("chains"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=console, transient=False)
        self.task = self.progress.add_task("label", total=total, completed=len(earlier), status=self._status())

    def _status(self) -> str:
        share = f"{self.steps} steps, {100 * self.right / self.steps:.0f}% right" if self.steps else "steps —"
        elapsed = time.perf_counter() - self.started
        speed = f" · {self.tokens:,} tok · {self.tokens / elapsed:.0f} tok/s" if self.tokens and elapsed > 0 else ""
        return share + speed

    def update(self, rows: list[dict]) -> None:
        self.steps += sum(len(r["labels"]) for r in rows)
        self.right += sum(sum(r["labels"]) for r in rows)
        self.tokens += sum(r.get("tokens", 0) for r in rows)
        self.progress.update(self.task, advance=len(rows), status=self._status())

    def __enter__(self) -> "LabelProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
