"""A live progress bar for an eval: problems done, ETA, running accuracy and token throughput."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class EvalProgress:
    """Counts the records already in the run (a resume starts part-way) and each new one."""

    def __init__(self, total: int, records: list[dict], problems, console: Console):
        wanted = {p.id for p in problems}
        earlier = [r for r in records if r["id"] in wanted]
        self.total = total
        self.done = len(earlier)
        self.correct = sum(bool(r.get("correct")) for r in earlier)
        self.tokens = 0
        self.started = time.perf_counter()
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=console, transient=False)
        self.task = self.progress.add_task("eval", total=total, completed=self.done, status=self._status())

    def _status(self) -> str:
        accuracy = f"acc {self.correct}/{self.done} ({100 * self.correct / self.done:.0f}%)" if self.done else "acc —"
        elapsed = time.perf_counter() - self.started
        speed = f" · {self.tokens / elapsed:.0f} tok/s" if self.tokens and elapsed > 0 else ""
        return accuracy + speed

    def update(self, record: dict) -> None:
        self.done += 1
        self.correct += bool(record.get("correct"))
        self.tokens += record.get("completion_tokens", 0)
        self.progress.update(self.task, advance=1, status=self._status())

    def __enter__(self) -> "EvalProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
