"""A run directory: the name of every file in it, and its self-describing checkpoints.

`mamlrun train` writes, `mamlrun eval` adds to, and `mamlrun report` / `reproduce` read these
files; all of them name the files through this module. Checkpoints hold the weights, optimizer,
every RNG state, iteration and resolved config.

A checkpoint holds everything needed to continue a run bit-for-bit on the CPU (`resume=`) or to
evaluate it without the original config files (`mamlrun eval checkpoint=`). Files are written to a
temporary name and renamed, so a run killed mid-save never leaves a truncated `last.pt`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamlrun.errors import UserError

# Files of a run directory (Hydra writes .hydra/, wandb writes wandb/ when logger=wandb).
CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"  # the latest checkpoint; the best one by validation
METRICS = "metrics.jsonl"  # one JSON object per logged point
EVAL = "eval.json"  # the test results
HYDRA_DIR = ".hydra"
CONFIG, OVERRIDES = "config.yaml", "overrides.yaml"  # in .hydra/: the composed config, overrides
LEARNING_CURVES = "learning_curves.png"
ADAPTATION = "adaptation.png"
SINUSOID_FITS = "sinusoid_fits.png"


def checkpoint_path(run_dir: Path, name: str = LAST) -> Path:
    return run_dir / CHECKPOINT_DIR / name


def hydra_file(run_dir: Path, name: str) -> Path:
    """A file Hydra wrote for the run: CONFIG or OVERRIDES."""
    return run_dir / HYDRA_DIR / name


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (HYDRA_DIR, EVAL, CHECKPOINT_DIR))


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` (`Trainer._checkpoint` lists its keys) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def resolve(path_or_run_dir: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file from a file path or a run directory (its `checkpoints/<prefer>`).

    Raises:
        UserError: naming the path when nothing loadable is there.
    """
    path = Path(path_or_run_dir).expanduser()
    if path.is_dir():
        names = dict.fromkeys((prefer, LAST))  # in order, once each
        for name in names:
            if (path / CHECKPOINT_DIR / name).is_file():
                return path / CHECKPOINT_DIR / name
        looked = " or ".join(f"{CHECKPOINT_DIR}/{name}" for name in names)
        raise UserError(
            f"{path}: no {looked} in this directory; "
            "pass a run directory of `mamlrun train` or a .pt file"
        )
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    return path


def load(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(
            f"{path}: not a readable mamlrun checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise UserError(f"{path}: not a mamlrun checkpoint (no model weights and config inside)")
    return payload


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of `checkpoints/`)."""
    return (
        checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent
    )
