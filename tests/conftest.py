"""Shared helpers: run the installed `mamlrun` console script as a user would, in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The installed console script, as users run it; `python -m mamlrun` where there is none (the
# GPU machines install mamlrun into a target folder without scripts).
_SCRIPT = Path(sys.executable).with_name("mamlrun")
MAMLRUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mamlrun"]

# Small settings for a run that finishes in seconds; tests add what they check on top.
QUICK = [
    "print_config=false",
    "logger=none",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=20",
    "train.checkpoint_every=10",
    "eval.tasks=20",
    "eval.plot_tasks=2",
]


def run_mamlrun(*args: str, cwd: Path, expect_ok: bool = True, timeout: int = 600):
    """Run `mamlrun ARGS` in `cwd`; returns the CompletedProcess (stdout and stderr as text)."""
    env = {**os.environ, "WANDB_SILENT": "true", "COLUMNS": "160"}
    env.pop("WANDB_MODE", None)
    result = subprocess.run(
        [*MAMLRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    if expect_ok and result.returncode != 0:
        raise AssertionError(
            f"mamlrun {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
        )
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mamlrun")
