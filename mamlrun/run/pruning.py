"""A `mamlrun train` run as one Optuna trial: its validation curve reported, pruned when asked.

`mamlrun tune` starts each trial as its own `mamlrun train` process (locally or as a SLURM job)
with the environment variables below naming the study's storage, the study and the trial. The
trainer then reports each validation to the trial through the storage itself (so the pruner
decides with every worker's curves, wherever the trial runs) and stops when the pruner says so:
`Pruned` ends the run cleanly, `checkpoints/last.pt` written for that iteration, and `job.json`
records the outcome, so the tuner marks the trial PRUNED rather than failed.

The storage and pruner factories live here, below the tuner, because both processes build them:
a trial must load the study with the same pruner as the tuner to get the same decisions. Optuna
is imported on first use only: a run without these variables never loads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mamlrun.errors import UserError

ENV_STORAGE = "MAMLRUN_OPTUNA_STORAGE"
ENV_STUDY = "MAMLRUN_OPTUNA_STUDY"
ENV_TRIAL = "MAMLRUN_OPTUNA_TRIAL"  # the trial's id in the storage (not its number)
ENV_PRUNER = "MAMLRUN_OPTUNA_PRUNER"  # the search file's pruner, as JSON
JOURNAL = "journal:"  # tune.storage=journal:<file>: Optuna's journal file (shared file systems)
SQLITE_TIMEOUT_S = 60  # trials and workers write one SQLite file: wait for its lock, not fail


class Pruned(Exception):
    """The pruner stopped the run after validating `iteration` (its checkpoint is written)."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"pruned by the study's pruner after iteration {iteration:,}")
        self.iteration = iteration


PRUNERS = {"median", "hyperband", "none"}


def make_pruner(spec: dict[str, Any] | None):
    """The Optuna pruner a search file's `pruner:` names: median (with `n_startup_trials`,
    `n_warmup_steps`, `interval_steps`), hyperband (`min_resource`, `max_resource`,
    `reduction_factor`) or none.

    Raises:
        UserError: an unknown pruner or option, naming it.
    """
    import optuna

    spec = dict(spec or {"type": "none"})
    kind = spec.pop("type", "median")
    classes = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    if kind not in classes:
        raise UserError(f"pruner.type={kind!r}: unknown pruner (choose from {', '.join(PRUNERS)})")
    try:
        return classes[kind](**spec)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"pruner: {err} (options of optuna.pruners.{classes[kind].__name__})"
        ) from None


def make_storage(url: str, heartbeat_s: int | None = None):
    """An Optuna storage from `tune.storage`: an RDB URL (sqlite:///file, postgresql://...) or
    `journal:<file>`. With `heartbeat_s`, an RDB storage records a heartbeat per running trial:
    a trial whose worker has been silent for twice that long is failed and retried once by the
    next worker to start (a remote worker killed mid-trial)."""
    import warnings

    import optuna

    # the heartbeat options are "experimental" in Optuna 5: said once in the README, not per run
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL) :]
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    if heartbeat_s:
        kwargs.update(
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        )
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL
        raise UserError(
            f"tune.storage={url}: cannot open this Optuna storage ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); give sqlite:///<file>, an RDB URL or "
            "journal:<file>"
        ) from None


class TrialReporter:
    """The Optuna trial this process trains, when `mamlrun tune` started it; `report` says
    whether to stop."""

    def __init__(self, environ: dict[str, str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = make_pruner(json.loads(environ.get(ENV_PRUNER) or "null"))
        storage = make_storage(environ[ENV_STORAGE])
        study = optuna.load_study(study_name=environ[ENV_STUDY], storage=storage, pruner=pruner)
        self.trial = optuna.trial.Trial(study, int(environ[ENV_TRIAL]))

    @classmethod
    def from_environment(cls) -> TrialReporter | None:
        """The trial named by the environment, or None for a run outside `mamlrun tune`."""
        if not all(os.environ.get(name) for name in (ENV_STORAGE, ENV_STUDY, ENV_TRIAL)):
            return None
        return cls(dict(os.environ))

    def report(self, score: float, iteration: int, final: bool = False) -> bool:
        """Report the validation `score` at `iteration`; True when the pruner stops the run. The
        pruner is not asked after the `final` iteration: a run that trained its whole budget is
        complete (stopping it then would save nothing and drop its value)."""
        self.trial.report(score, iteration)
        return not final and self.trial.should_prune()
