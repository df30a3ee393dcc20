"""Terminal output with rich: the config tree, the training progress bar and result tables.

Output goes to stderr-free stdout through one `Console`; when stdout is not a terminal (CI, pipes,
Hydra multirun logs) rich falls back to plain lines, so logs stay readable.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.tree import Tree

# Logs and pipes get 160 columns rather than rich's 80, so wide tables stay readable
# (COLUMNS in the environment still wins).
console = Console(highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(highlight=False, width=160)


def info(message: str) -> None:
    console.print(f"[bold cyan]mamlrun[/] {message}")


def print_config_tree(config: dict[str, Any], title: str = "config") -> None:
    """The composed config as a tree, groups first (what was picked), then the rest."""

    def add(branch: Tree, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                add(branch.add(f"[bold]{key}[/]"), value)
            else:
                branch.add(f"{key}: [green]{value!r}[/]")

    tree = Tree(f"[bold]{title}[/]")
    add(tree, config)
    console.print(tree)


def progress(shown: bool = True) -> Progress:
    """Iterations done / total, it/s, elapsed, ETA and the latest losses (field `losses`);
    `shown=False` draws nothing (a data-parallel rank other than 0)."""
    return Progress(
        TextColumn("[bold]meta-train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        console=console,
        transient=False,
        disable=not shown,
    )


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
