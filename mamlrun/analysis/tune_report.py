"""The results of a `mamlrun tune` study: a table of its trials, the best one and the
`mamlrun train` command that reproduces it, `best.yaml`, `trials.csv` and Optuna's plots.

Written at the end of `mamlrun tune` and by `mamlrun report outputs/tune/<study>`, both from the
study's storage (named in the directory's `tune.json`), so a study still running, or filled by
workers elsewhere, reports what its storage holds now.
"""

from __future__ import annotations

import csv
import json
import shlex
import warnings
from pathlib import Path
from typing import Any

import yaml

from mamlrun import console
from mamlrun.errors import UserError
from mamlrun.run import rundir

TUNE_RECORD = "tune.json"
BEST_FILE, TRIALS_FILE = "best.yaml", "trials.csv"
PLOTS = ("history", "importances", "slice")


def read_record(study_dir: Path) -> dict[str, Any]:
    """The study directory's `tune.json`.

    Raises:
        UserError: the directory holds no study of `mamlrun tune`.
    """
    path = study_dir / TUNE_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{study_dir}: no {TUNE_RECORD} (not a study of mamlrun tune)") from None


def load_recorded_study(record: dict[str, Any]):
    import optuna

    from mamlrun.run.pruning import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(
            study_name=record["study"], storage=make_storage(record["storage"])
        )
    except KeyError:
        raise UserError(f"{record['storage']}: no study {record['study']!r} there") from None


def _threads_override(record: dict[str, Any], trial) -> list[str]:
    """`hardware.threads=N` as the trial trained with (job.json), unless the command sets it:
    a CPU run's numbers depend on its thread count, and the reproducing run has no share."""
    if any(o.startswith("hardware.threads=") for o in record["train_overrides"]):
        return []
    threads = rundir.last_attempt(Path(trial.user_attrs.get("run_dir", "."))).get("threads")
    return [f"hardware.threads={threads}"] if isinstance(threads, int) else []


def best_command(record: dict[str, Any], trial) -> str:
    """The `mamlrun train` command that trains the trial again: the train overrides, the budget
    and its parameters (no tune keys, no run directory of the study)."""
    params = [f"{key}={value}" for key, value in trial.params.items()]
    words = [*record["budget_overrides"], *record["train_overrides"], *params]
    words += _threads_override(record, trial)
    return shlex.join(["mamlrun", "train", *words])


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, iterations run, wall time, parameters."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {
            "number": trial.number,
            "state": trial.state.name.lower(),
            "value": trial.value,
            "iterations": trial.user_attrs.get("iterations"),
            "seconds": trial.user_attrs.get("seconds"),
        }
        row.update(trial.params)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_study(study, record: dict[str, Any]) -> dict[str, Any] | None:
    """The table of trials and the best trial; returns the best trial's summary (or None)."""
    rows = trial_rows(study)
    keys = sorted(
        {k for row in rows for k in row} - {"number", "state", "value"} - {"iterations", "seconds"}
    )
    headers = ["trial", "state", record["metric"], "iterations", "wall s", *keys]
    table = [
        [
            _cell(r["number"]),
            r["state"],
            _cell(r["value"]),
            _cell(r["iterations"]),
            _cell(r["seconds"]),
        ]
        + [_cell(r.get(k)) for k in keys]
        for r in rows
    ]
    console.print_table(f"mamlrun tune: study {record['study']}", headers, table)
    counts = {
        state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "fail")
    }
    budget = _budget_iterations(record)
    run = sum(r["iterations"] or 0 for r in rows if r["state"] in ("complete", "pruned"))
    done = counts["complete"] + counts["pruned"]
    console.info(
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed; "
        f"iterations run {run:,} of {done * budget:,} ({done} trials x {budget:,})"
        if budget
        else f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed"
    )
    try:
        best = study.best_trial
    except ValueError:
        console.info("no complete trial yet")
        return None
    summary = {
        "study": record["study"],
        "trial": best.number,
        "value": best.value,
        "metric": record["metric"],
        "direction": record["direction"],
        "params": dict(best.params),
        "command": best_command(record, best),
        "run_dir": best.user_attrs.get("run_dir"),
    }
    console.info(f"best trial {best.number}: {record['metric']} {best.value:.6g} {best.params}")
    console.info(f"reproduce it with: {summary['command']}")
    return summary


def _budget_iterations(record: dict[str, Any]) -> int | None:
    for override in record["budget_overrides"]:
        key, _, value = override.partition("=")
        if key == "train.iterations" and value.isdigit():
            return int(value)
    return None


def write_results(study, study_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Print the study and write best.yaml, trials.csv and the plots into `study_dir`."""
    best = print_study(study, record)
    written = [_write_csv(study, study_dir / TRIALS_FILE)]
    if best is not None:
        path = study_dir / BEST_FILE
        path.write_text(yaml.safe_dump(best, sort_keys=False))
        written.append(path)
    written += write_plots(study, study_dir)
    console.info(f"wrote {', '.join(str(p) for p in written)}")
    return written


def _write_csv(study, path: Path) -> Path:
    rows = trial_rows(study)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields or ["number"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plots(study, study_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots: optimization history, parameter importances and the objective
    against each parameter; a plot Optuna cannot draw yet (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    drawers = {
        "history": views.plot_optimization_history,
        "importances": views.plot_param_importances,
        "slice": views.plot_slice,
    }
    written = []
    for name, draw in drawers.items():
        path = study_dir / f"{name}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every plot
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                console.info(f"{name}.png not drawn: {err}")
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        first.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(first.figure)
        written.append(path)
    return written
