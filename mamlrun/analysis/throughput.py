"""Measured meta-training throughput per preset: the data behind `mamlrun reproduce --dry-run`'s
time estimates, kept in a JSON file (`throughput.json` next to this module, shipped as package
data) that `mamlrun bench` rewrites with what it measures, so that no speed is written in code.

Layout: {"about": ..., "<device kind>": {"label": ..., "presets": {"<preset>": {
"tasks_per_second": ..., "machine": ..., "command": ..., "date": ...}}}}, device kinds `cpu`
and `cuda`. Each preset keeps its own machine, command and date: a bench updates only the presets
it measured, and the others must still say where their numbers come from.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

THROUGHPUT_FILE = Path(__file__).with_name("throughput.json")
# Another file for reproduce to read (tests point it at what a bench wrote).
THROUGHPUT_ENV = "MAMLRUN_THROUGHPUT"


def throughput_file() -> Path:
    return Path(os.environ.get(THROUGHPUT_ENV) or THROUGHPUT_FILE).expanduser()


def read_throughput(path: Path | None = None) -> dict[str, Any]:
    """The file's content; {} where it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads((path or throughput_file()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def device_throughput(kind: str, path: Path | None = None) -> tuple[str | None, dict[str, float]]:
    """(label, tasks/s per preset) of one device kind; entries that are not numbers are left out."""
    section = read_throughput(path).get(kind)
    if not isinstance(section, dict):
        return None, {}
    presets = section.get("presets")
    rates = {}
    for name, entry in (presets if isinstance(presets, dict) else {}).items():
        rate = entry.get("tasks_per_second") if isinstance(entry, dict) else None
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            rates[name] = float(rate)
    label = section.get("label")
    return (label if isinstance(label, str) else None), rates


def record_throughput(
    path: Path, kind: str, label: str, measured: dict[str, float], machine: str, command: str
) -> None:
    """Set `measured` (tasks/s per preset) in the file's `kind` section, keeping the other entries;
    written atomically (a temporary file, then a rename) as strict JSON."""
    data = read_throughput(path)
    section = data.get(kind) if isinstance(data.get(kind), dict) else {}
    section["label"] = label
    presets = section.get("presets") if isinstance(section.get("presets"), dict) else {}
    date = time.strftime("%Y-%m-%d")
    for name, rate in measured.items():
        presets[name] = {
            "tasks_per_second": float(f"{rate:.4g}"),
            "machine": machine,
            "command": command,
            "date": date,
        }
    section["presets"] = dict(sorted(presets.items()))
    data[kind] = section
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(partial, path)
