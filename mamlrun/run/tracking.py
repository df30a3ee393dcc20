"""Where metrics go: always `metrics.jsonl` in the run directory, and optionally Weights & Biases.

Metric keys are `split/name` (`train/loss_post`, `val/mse_step10`, `test/K5/mse_step1`). wandb is
imported only when `logger=wandb`, so `logger=none` never touches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from mamlrun.errors import UserError

METRICS_FILE = "metrics.jsonl"


class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...
    def log_images(self, paths: list[Path], step: int) -> None: ...
    def log_table(
        self, name: str, columns: list[str], rows: list[list[Any]], step: int
    ) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """`logger=none`."""

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
        self.path = run_dir / METRICS_FILE
        if keep_until is not None and self.path.exists():
            # Resuming: rows logged after the checkpoint will be logged again, identically.
            kept = [r for r in read_metrics(self.path) if r["iteration"] <= keep_until]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, iteration: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"iteration": iteration, "split": split, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def prefixed(split: str, row: dict[str, Any]) -> dict[str, Any]:
    """`split/name` keys for a metrics row, without its bookkeeping fields."""
    return {f"{split}/{k}": v for k, v in row.items() if k not in ("iteration", "split")}
