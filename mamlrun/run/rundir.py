"""A run directory: the name of every file in it, and its self-describing checkpoints.

`mamlrun train` writes, `mamlrun eval` adds to, and `mamlrun report` / `reproduce` read these
files; all of them name the files through this module. Checkpoints hold the weights, optimizer,
every RNG state, iteration and resolved config.

A checkpoint holds everything needed to continue a run bit-for-bit on the CPU (`resume=`) or to
evaluate it without the original config files (`mamlrun eval checkpoint=`). A checkpoint is data,
never code: tensors, numbers, strings and containers of them, read with
`torch.load(weights_only=True)`, so a shared checkpoint cannot run code when it is loaded. Files are
written to a temporary name, fsynced and renamed, so a failed or killed save never leaves a
truncated `last.pt`. One `mamlrun train` at a time holds a run directory (`hold`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import io
import json
import os
import pickle
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamlrun.data.atomic import write_atomically
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
JOB = "job.json"  # who ran the run, per attempt: host, pid, threads, SLURM job, start iteration
LOCK = ".mamlrun.lock"  # held (flock) by the `mamlrun train` writing the run; holds its pid


def checkpoint_path(run_dir: Path, name: str = LAST) -> Path:
    return run_dir / CHECKPOINT_DIR / name


def hydra_file(run_dir: Path, name: str) -> Path:
    """A file Hydra wrote for the run: CONFIG or OVERRIDES."""
    return run_dir / HYDRA_DIR / name


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (HYDRA_DIR, EVAL, CHECKPOINT_DIR))


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as data only (`torch.load(weights_only=True)` reads it back)."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_data(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_as_data(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its uint32 key array as an int64 tensor (exact)."""
    name, keys, *rest = state
    return (name, torch.from_numpy(np.asarray(keys).astype(np.int64)), *rest)


DATA_TYPES = (torch.Tensor, str, int, float, bool, type(None))


def check_data(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first part of `value` that is not data: only tensors, numbers,
    strings, None and dicts, lists and tuples of them load with `weights_only=True`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}")
            check_data(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_data(item, f"{where}[{index}]")
    elif type(value) not in DATA_TYPES and not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}")


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (`Trainer._checkpoint` lists its keys) to `path`, all or nothing.

    The payload must be data only (`check_data`): a checkpoint is loaded with
    `torch.load(weights_only=True)`, never unpickled. It is serialized in memory, then written by
    `write_atomically`: the previous file stays whole until the new one is on disk.

    Raises:
        UserError: the file cannot be written (a full disk, a file-size limit), naming the path
            and the fix; the previous checkpoint is intact and no temporary file is left.
    """
    check_data(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        write_atomically(path, lambda file: file.write(buffer.getbuffer()))
    except OSError as err:
        raise UserError(
            f"{path}: cannot write the checkpoint ({err.strerror or err}); free disk space or "
            f"raise the file-size limit (ulimit -f), then continue with: mamlrun train "
            f"resume={run_dir_of(path)} (the previous checkpoint is kept)"
        ) from None


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


class UnsafeCheckpoint(UserError):
    """A file refused because loading it would need more than data (code, pickled objects)."""


def load(path: Path) -> dict[str, Any]:
    """A checkpoint read as data only: `torch.load(weights_only=True)`, never unpickled.

    Raises:
        UserError: the file needs anything but tensors and plain data to load (naming what, and
            for an older mamlrun checkpoint, the command that converts it), or is no checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(_refusal(path, err)) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(
            f"{path}: not a readable mamlrun checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise UserError(f"{path}: not a mamlrun checkpoint (no model weights and config inside)")
    return payload


def _refusal(path: Path, err: Exception) -> str:
    """Why a file that is not data only is refused, naming what it would import (read from the
    pickle without running it)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: take the names from the error
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    if names and all(name.startswith("numpy.") for name in names):
        return (
            f"{path}: written by an older mamlrun (NumPy's RNG state pickled), refused as it would "
            f"have to be unpickled; if you trust this file, convert it once with: mamlrun "
            f"checkpoint convert {path}"
        )
    if not names:  # nothing it would import: not a pickle, or not a checkpoint at all
        return f"{path}: not a readable mamlrun checkpoint ({type(err).__name__})"
    shown = ", ".join(names[:3])
    return (
        f"{path}: refused: loading it would import {shown}, which can run code; a mamlrun "
        "checkpoint holds only tensors and plain data, so do not use this file unless you "
        "know where it comes from"
    )


def convert_legacy(source: Path, out: Path) -> dict[str, Any]:
    """Rewrite an older checkpoint (NumPy's RNG state pickled) as data only, atomically.

    It UNPICKLES `source` (`torch.load(weights_only=False)`), which runs whatever code the file
    names: call it only on files you trust. Returns the converted payload.

    Raises:
        UserError: `source` is no mamlrun checkpoint, or holds something that is not data.
    """
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(f"{source}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise UserError(f"{source}: not a mamlrun checkpoint (no model weights and config inside)")
    numpy_state = payload.get("rng", {}).get("numpy")
    if numpy_state is not None and isinstance(numpy_state[1], np.ndarray):
        payload["rng"]["numpy"] = _numpy_state_as_data(numpy_state)
    try:
        check_data(payload)
    except TypeError as err:
        raise UserError(f"{source}: cannot convert: {err}, not data") from None
    save(out, payload)
    return payload


def holder(run_dir: Path) -> str | None:
    """The pid of the `mamlrun train` holding `run_dir` (`hold`), or None where none does."""
    if not (run_dir / LOCK).is_file():
        return None
    fd = os.open(run_dir / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # releases the probe's own lock, if it got one
    return None


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for one `mamlrun train` while the block runs.

    An exclusive `flock` on `run_dir/.mamlrun.lock`: the kernel releases it when its process
    ends, however it ends, so a lock left by a killed run is simply taken over and never goes
    stale. The file holds the holder's pid, only to name it in the message.

    Raises:
        UserError: another process holds the directory, naming the directory and its pid.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{run_dir}: another mamlrun train (pid {holder}) is writing this run directory; "
                "wait for it to finish or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of `checkpoints/`)."""
    return (
        checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent
    )


def load_weights(model: torch.nn.Module, payload: dict[str, Any], source: Path) -> None:
    """Load the checkpoint's weights into the model its own config describes.

    Raises:
        UserError: the weights do not fit that model (a file put together from two runs, or
            edited): one line naming `source`, not PyTorch's list of every mismatched tensor.
    """
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:2])[:300] if first else type(err).__name__
        raise UserError(
            f"{source}: its weights do not fit the model its config describes ({reason}); it is "
            "not a checkpoint mamlrun wrote for one run: use the checkpoint of the run you mean"
        ) from None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left while it wrote a checkpoint, eval.json or
    metrics.jsonl, job.json or `.hydra/` (`write_atomically`'s `.<name>.<pid>.tmp`): each is an
    unfinished copy whose complete predecessor (if any) is still in place. Call it holding the
    directory (`hold`)."""
    folders = (run_dir, run_dir / CHECKPOINT_DIR, run_dir / HYDRA_DIR)
    left = [path for folder in folders for path in folder.glob(".*.tmp")]
    for path in left:
        path.unlink(missing_ok=True)
    return left


def record_attempt(run_dir: Path, start_iteration: int, threads: int, world_size: int = 1) -> None:
    """Add this process to `job.json`'s attempts (a fresh run starts the list anew): where each
    attempt ran and, in a SLURM job, its job id and restart count, so a requeued job's history is
    in the run directory. A damaged record is replaced: it is information, not state."""
    path = run_dir / JOB
    attempts: list[Any] = []
    if start_iteration > 0 and path.is_file():
        with contextlib.suppress(ValueError, AttributeError, OSError):
            attempts = list(json.loads(path.read_text())["attempts"])
    slurm = None
    if "SLURM_JOB_ID" in os.environ:
        keys = ("job_id", "array_job_id", "array_task_id", "restart_count")
        slurm = {key: os.environ.get(f"SLURM_{key.upper()}") for key in keys}
    attempts.append(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "start_iteration": start_iteration,
            "threads": threads,
            "world_size": world_size,  # processes training the run together (distributed)
            "slurm": slurm,
        }
    )
    _write_job(path, {"attempts": attempts})


def _write_job(path: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(path, lambda file: file.write(text.encode()))


def record_outcome(run_dir: Path, outcome: str, at_iteration: int) -> None:
    """Mark the last attempt of `job.json` with how it ended when that is not "trained to the
    end" nor a failure: `pruned` (a `mamlrun tune` trial its pruner stopped) at `at_iteration`.
    `mamlrun tune` and `mamlrun report` read it (`last_attempt`)."""
    path = run_dir / JOB
    try:
        record = json.loads(path.read_text())
        record["attempts"][-1].update(outcome=outcome, at_iteration=at_iteration)
    except (OSError, ValueError, KeyError, IndexError, AttributeError, TypeError):
        return  # no record of this attempt to mark: information, not state
    _write_job(path, record)


def last_attempt(run_dir: Path) -> dict[str, Any]:
    """The last attempt of `job.json` (its `threads`; `outcome` where `record_outcome` marked
    it); {} where there is none."""
    try:
        attempt = json.loads((run_dir / JOB).read_text())["attempts"][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}
    return attempt if isinstance(attempt, dict) else {}
