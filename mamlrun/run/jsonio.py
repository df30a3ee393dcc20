"""Strict JSON for every file mamlrun writes (eval.json, metrics.jsonl).

Python's `json` writes a non-finite float as `NaN` or `Infinity`, which is not JSON: `JSON.parse`
and other strict readers refuse the whole file. mamlrun writes such a value as `null` instead;
in eval.json the per-step `diverged` count says why it is missing (a diverged test task makes the
mean and CI non-finite), and the median, which counts divergence as +inf, is null only where more
than half the tasks diverged.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float, in any nesting of dicts, lists and tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of `value`: non-finite floats as null (never `NaN` or `Infinity`)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def nan_for_null(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as read back: a null metric (it was non-finite) as nan, as it was logged."""
    return {key: math.nan if value is None else value for key, value in row.items()}
