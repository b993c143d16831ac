"""Figures as a rich table: label statistics, agreement, F1."""
from __future__ import annotations

from rich.table import Table


def figures_table(title: str, values: dict) -> Table:
    """One row per figure; lists (per-chain references and predictions) are left to --json."""
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in values.items():
        if isinstance(value, list):
            continue
        text = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else f"{value:,}"
        table.add_row(key.replace("_", " "), text)
    return table
