"""Reading finished runs: what a run directory holds, and the run's status from the files it left.

A run directory is read, never re-run: its config (`checkpoints/last.pt`, which reflects a resumed
run's changes, else `.hydra/config.yaml`), its overrides (`.hydra/overrides.yaml`), `metrics.jsonl`
and `eval.json`. Runs that did not finish get a status (failed / unfinished / not evaluated), so
a table can list them instead of dropping them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamlrun.config.compose import parse_overrides
from mamlrun.errors import UserError
from mamlrun.run import rundir
from mamlrun.run.rundir import UnsafeCheckpoint, is_run_dir, load
from mamlrun.run.tracking import read_metrics

# A run's status, from the files it left.
FINISHED = "finished"
NOT_EVALUATED = "not evaluated"  # trained to the end, no eval.json (e.g. train.eval_at_end=false)
UNFINISHED = "unfinished"  # a checkpoint before the last iteration: `mamlrun train resume=<dir>`
PRUNED = "pruned"  # a `mamlrun tune` trial its pruner stopped early (job.json), not a failure
FAILED = "failed"  # neither a checkpoint nor eval.json: the job raised (or has just started)
NOT_RUN = "not run"  # the directory does not exist


@dataclass
class Run:
    """What one run directory holds."""

    path: Path
    status: str
    config: dict[str, Any]
    overrides: list[str]
    iteration: int | None = None  # of the last checkpoint
    iterations: int | None = None  # planned, after `budget`
    evaluation: dict[str, Any] | None = None  # eval.json
    val: dict[str, Any] | None = None  # the last validation row of metrics.jsonl
    seconds: float | None = None
    threads: int | None = None  # what its last attempt trained with (job.json)

    @property
    def preset(self) -> str:
        """The experiment preset (`finn2017/omniglot_5w1s`), else the directory name."""
        for override in parse_overrides(self.overrides):
            if override.key == "experiment" and override.value_text is not None:
                return override.value_text
        return self.path.name

    @property
    def metric(self) -> str:
        if self.evaluation:
            return self.evaluation["metric"]
        return "mse" if self.config.get("dataset", {}).get("name") == "sinusoid" else "acc"


def _natural(name: str) -> tuple[bool, int, str]:
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths`, or below them (a multirun sweep); hidden folders skipped."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such directory")
        if is_run_dir(path):
            found.append(path)
            continue
        for root, dirs, _ in os.walk(path):
            # Hydra's job folders 0, 1, ..., 10 in numeric order; hidden ones (.replaced) skipped.
            dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural)
            if is_run_dir(Path(root)) and Path(root) != path:
                found.append(Path(root))
                dirs[:] = []  # a run's own subfolders (checkpoints, wandb) hold no runs
    return found


def _planned_iterations(config: dict[str, Any]) -> int | None:
    """`train.iterations` after `budget`, computed by the same validation a run uses."""
    from omegaconf import OmegaConf

    from mamlrun.config.validate import validate

    try:
        return validate(OmegaConf.create(config)).train.iterations
    except Exception:  # noqa: BLE001 - another mamlrun version's config, or a refused one
        planned = (config.get("train") or {}).get("iterations")
        return planned if isinstance(planned, int) else None


def _last_val(path: Path) -> dict[str, Any] | None:
    metrics = path / rundir.METRICS
    if not metrics.is_file():
        return None
    rows = read_metrics(metrics)  # a null (non-finite) metric as nan
    val = [r for r in rows if r.get("split") == "val"]
    return val[-1] if val else None


def _wall_seconds(path: Path) -> float | None:
    """From the run's first file (.hydra/config.yaml) to its last write: includes any pause
    between an interruption and `resume=`, so it is approximate."""
    start = rundir.hydra_file(path, rundir.CONFIG)
    ends = [path / rundir.EVAL, path / rundir.METRICS, rundir.checkpoint_path(path)]
    ends = [p.stat().st_mtime for p in ends if p.exists()]
    if not start.exists() or not ends:
        return None
    return max(0.0, max(ends) - start.stat().st_mtime)


def _threads(path: Path) -> int | None:
    """The intra-op threads of the run's last attempt (`job.json`; None for runs without one)."""
    threads = rundir.last_attempt(path).get("threads")
    return threads if isinstance(threads, int) else None


def load_run(path: Path) -> Run:
    """Read a run directory; a missing one is a run with status `not run`."""
    path = path.resolve()
    if not path.is_dir():
        return Run(path, NOT_RUN, {}, [])
    overrides_file = rundir.hydra_file(path, rundir.OVERRIDES)
    overrides = (
        (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []
    )
    config: dict[str, Any] = {}
    iteration = None
    last = rundir.checkpoint_path(path)
    if last.is_file():
        try:
            payload = load(last)
            config, iteration = payload["config"], payload["iteration"]
        except UnsafeCheckpoint:
            raise  # never skipped quietly: the user must see it is refused, and why
        except UserError:
            pass  # a truncated checkpoint: the run is treated as if it had none
    config_file = rundir.hydra_file(path, rundir.CONFIG)
    if not config and config_file.exists():
        config = yaml.safe_load(config_file.read_text()) or {}
    evaluation = None
    if (path / rundir.EVAL).is_file():
        # non-finite values are null (older files: NaN, Infinity, which json also reads)
        evaluation = json.loads((path / rundir.EVAL).read_text())
    iterations = _planned_iterations(config) if config else None
    if evaluation is not None:
        status = FINISHED
    elif rundir.last_attempt(path).get("outcome") == PRUNED:
        status = PRUNED
    elif iteration is None:
        status = FAILED
    elif iterations is not None and iteration < iterations:
        status = UNFINISHED
    else:
        status = NOT_EVALUATED
    return Run(
        path,
        status,
        config,
        list(overrides),
        iteration,
        iterations,
        evaluation,
        _last_val(path),
        _wall_seconds(path),
        _threads(path),
    )
