"""Where metrics go: always `metrics.jsonl` in the run directory, and optionally Weights & Biases.

Metric keys are `split/name` (`train/loss_post`, `val/mse_step10`, `test/K5/mse_step1`). wandb is
imported only when `logger=wandb`, so `logger=none` never touches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from hydra.core.hydra_config import HydraConfig

from mamlrun.config.schema import NoLogger, WandbLogger
from mamlrun.data.atomic import write_atomically
from mamlrun.errors import UserError
from mamlrun.run import jsonio
from mamlrun.run.rundir import METRICS


class Tracker(Protocol):
    """Where a run's metrics, plots and tables go besides metrics.jsonl.

    `run_id` names the tracker's run, saved in checkpoints so that `resume=` continues it
    (None: nothing to continue)."""

    @property
    def run_id(self) -> str | None: ...
    def log(self, row: dict[str, Any], step: int) -> None: ...
    def log_images(self, paths: list[Path], step: int) -> None: ...
    def log_table(
        self, name: str, columns: list[str], rows: list[list[Any]], step: int
    ) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """`logger=none`."""

    run_id = None  # nothing to resume

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, paths: list[Path], step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """A wandb run, offline unless `mode=online` (WANDB_MODE in the environment wins).

    Offline runs are written under `<run dir>/wandb/` and can be uploaded later with `wandb sync`.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str,
        project: str,
        name: str,
        group: str,
        entity: str | None = None,
        tags: list[str] | None = None,
        resume_id: str | None = None,
    ) -> None:
        import wandb  # imported here: logger=none must not pay for it or touch its files

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", mode)
        try:
            self.run = wandb.init(
                dir=str(run_dir),
                mode=mode,
                project=project,
                entity=entity,
                name=name,
                group=group,
                tags=tags or [],
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
        except wandb.errors.Error as err:  # no API key, no network, a bad entity: before any work
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"logger.mode={mode}: wandb could not start a run: {reason} (run `wandb login` "
                "or set WANDB_API_KEY; or train with logger.mode=offline and `wandb sync` later)"
            ) from None

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(row, step=step)

    # Every call passes an explicit step: wandb drops rows whose step is below its current one.
    def log_images(self, paths: list[Path], step: int) -> None:
        self.run.log({f"plots/{p.stem}": self._wandb.Image(str(p)) for p in paths}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)}, step=step)
        for row in rows:
            self.run.summary[f"{name}/{row[0]}"] = row[1:]

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MetricsFile:
    """Append-only `metrics.jsonl`: one JSON object per logged point (iteration, split, metrics)."""

    def __init__(self, run_dir: Path, keep_until: int | None = None) -> None:
        self.path = run_dir / METRICS
        if keep_until is not None and self.path.exists():
            # Resuming: rows logged after the checkpoint will be logged again, identically.
            kept = [r for r in _complete_rows(self.path) if r["iteration"] <= keep_until]
            text = "".join(jsonio.dumps(r) + "\n" for r in kept)
            write_atomically(self.path, lambda file: file.write(text.encode()))
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, iteration: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append a row (a non-finite metric is written as null) and return it, floats kept."""
        row = {"iteration": iteration, "split": split, **metrics}
        try:
            with self.path.open("a") as f:
                f.write(jsonio.dumps(row) + "\n")
        except OSError as err:  # a full disk fails at the flush, which names no file
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        return row


class UnwrittenMetrics:
    """`MetricsFile` of a rank other than 0 in data-parallel training: rows are returned, never
    written (rank 0 alone writes the run directory)."""

    def write(self, iteration: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"iteration": iteration, "split": split, **metrics}


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows without a last line cut short (its process died, or the disk filled,
    while it was written): that row is logged again after the checkpoint anyway."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(jsonio.nan_for_null(json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise  # damage inside the file is not a write cut short
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a null metric (non-finite when logged) comes back as nan."""
    with Path(path).open() as f:
        return [jsonio.nan_for_null(json.loads(line)) for line in f if line.strip()]


def prefixed(split: str, row: dict[str, Any]) -> dict[str, Any]:
    """`split/name` keys for a metrics row, without its bookkeeping fields."""
    return {f"{split}/{k}": v for k, v in row.items() if k not in ("iteration", "split")}


def make_tracker(
    logger: WandbLogger | NoLogger,
    run_dir: Path,
    config: dict[str, Any],
    resume_id: str | None = None,
) -> Tracker:
    """The experiment tracker chosen by `logger=`. The run's name derives from its config
    (dataset, algorithm, seed); a multirun job's name carries its number and its group is the
    sweep (its directory, e.g. `multirun/2026-01-01_12-00-00`), so one sweep's runs, whatever
    they vary, are one group in W&B. A single run's group is `<dataset>-<algorithm>`."""
    if logger.name == "none":
        return NullTracker()
    kind = f"{config['dataset']['name']}-{config['algorithm']['name']}"
    name = logger.run_name or f"{kind}-seed{config.get('seed', 0)}"
    group = logger.group or kind
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is not None and hydra.mode.name == "MULTIRUN":
        name = f"{name}-job{hydra.job.num}"
        sweep = Path(hydra.sweep.dir).resolve()
        group = logger.group or f"{sweep.parent.name}/{sweep.name}"
    return WandbTracker(
        run_dir,
        config,
        logger.mode,
        logger.project,
        name,
        group,
        logger.entity,
        logger.tags,
        resume_id=resume_id,
    )
