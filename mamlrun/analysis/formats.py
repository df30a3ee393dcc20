"""How the tables write numbers: one place, so the comparison, the runs table and the sweep table
print the same value the same way."""

from __future__ import annotations

import math

from mamlrun.run.evaluation import number_text


def scale(metric: str) -> tuple[float, int, str]:
    """Accuracy in percent with 2 decimals, as the paper's tables; MSE as is with 3."""
    return (100.0, 2, " %") if metric == "acc" else (1.0, 3, "")


def format_value(metric: str, mean: float | None, ci: float | None = None) -> str:
    """`mean ± ci` as the test table writes numbers (scientific from 1e6 on); a None or infinite
    mean (null in eval.json: tasks diverged) is `inf`."""
    factor, digits, unit = scale(metric)
    if mean is None or not math.isfinite(mean):
        return ("-inf" if mean == -math.inf else "inf") + unit
    text = number_text(factor * mean, digits)
    if ci is not None:
        text += f" ± {number_text(factor * ci, digits)}"
    return text + unit


def signed_text(metric: str, value: float) -> str:
    """A difference with its sign: `+0.394`, `-0.003`, `+inf`."""
    factor, digits, unit = scale(metric)
    text = number_text(factor * value, digits)
    return ("" if text.startswith("-") else "+") + text + unit


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_cell(value: object) -> object:
    """A list (one value per seed) as `a;b;c` in one CSV field; anything else as is."""
    if isinstance(value, list | tuple):
        return ";".join("" if v is None else str(v) for v in value)
    return value
