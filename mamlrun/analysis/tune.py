"""`mamlrun tune`: an Optuna study whose trials are `mamlrun train` runs.

Workers are threads of this process (`tune.workers`), each running one trial at a time as a
`mamlrun train` subprocess (or, with `hydra/launcher=slurm`, a one-job `mamlrun train -m` that
submits it): the process keeps its own config composition, run directory, checkpoints and
signals, and a trial that crashes is a failed trial, not a dead tuner. The study lives in its
storage (SQLite in `outputs/tune/<study>/` by default): any number of `mamlrun tune` processes,
on any machines that reach the storage, fill the same study, and rerunning the command continues
it. The trial reports its validation curve to the storage itself (`mamlrun.run.pruning`), so
pruning works wherever the trial runs.

A tuner killed mid-trial leaves its trial RUNNING in the storage; its trial processes die with it
(a parent-death signal). The next tuner on that host sees the dead pid recorded with the trial,
marks the trial failed and queues its parameters again (a retry). For workers elsewhere, RDB
storages also keep a heartbeat per trial (`HEARTBEAT_S`): a silent trial is failed and retried
by the next worker to start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamlrun import console
from mamlrun.analysis.search import SearchSpace
from mamlrun.errors import UserError
from mamlrun.run import pruning, rundir

TUNE_ROOT = Path("outputs") / "tune"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
TRIAL_LOG = "train.log"
HEARTBEAT_S = 60
_PR_SET_PDEATHSIG = 1


@dataclass
class TuneOptions:
    """`tune.*` and the launcher arguments of the command line."""

    trials: int
    workers: int = 1
    storage: str | None = None
    study: str | None = None
    launcher: list[str] = field(default_factory=list)  # hydra/launcher=..., hydra.launcher.*

    def study_dir(self) -> Path:
        return (TUNE_ROOT / str(self.study)).resolve()

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_dir() / STUDY_DB}"


class TrialFailed(Exception):
    """The trial's `mamlrun train` exited with an error (Optuna records the trial as FAIL)."""


def _die_with_parent() -> None:
    """In the trial process before exec: SIGKILL when the tuner thread that started it dies, so
    a tuner killed with -9 leaves no orphan trial training on."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def mamlrun_command() -> list[str]:
    """How this process was started as mamlrun: the console script, else `python -m mamlrun`."""
    script = Path(sys.executable).with_name("mamlrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mamlrun"]


class TrialRunner:
    """The objective: sample the parameters, train them in a run directory of their own, and
    return the run's best validation value (or mark the trial pruned)."""

    def __init__(self, space: SearchSpace, options: TuneOptions, train_overrides: list[str]):
        self.space, self.options, self.train_overrides = space, options, train_overrides
        # Workers are threads drawing from the sampler's one RNG: a trial draws all its values
        # at once, so a seeded study tries the same sets of values however the threads run.
        self._drawing = threading.Lock()

    def command(self, params: dict[str, Any], run_dir: Path) -> list[str]:
        overrides = [*self.space.budget_overrides(), *self.train_overrides]
        overrides += [f"{key}={value}" for key, value in params.items()]
        if self.space.uses_wandb:
            overrides.append(f"logger.group=tune-{self.options.study}")
        if self.options.launcher:  # one SLURM job (or other launcher job) per trial
            place = [f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=."]
            return [*mamlrun_command(), "train", "-m", *self.options.launcher, *overrides, *place]
        return [*mamlrun_command(), "train", *overrides, f"hydra.run.dir={run_dir}"]

    def environment(self, trial) -> dict[str, str]:
        import json

        # K trials at once on this machine share its cores; a launcher's jobs have their own
        shared = (
            {} if self.options.launcher else {"MAMLRUN_CONCURRENT_JOBS": str(self.options.workers)}
        )
        return {
            **os.environ,
            **shared,
            pruning.ENV_STORAGE: self.options.storage_url(),
            pruning.ENV_STUDY: str(self.options.study),
            pruning.ENV_TRIAL: str(trial._trial_id),
            pruning.ENV_PRUNER: json.dumps(self.space.pruner),
            "WANDB_SILENT": "true",
        }

    def __call__(self, trial) -> float:
        import optuna

        with self._drawing:
            params = {param.key: param.suggest(trial) for param in self.space.params}
        run_dir = self.options.study_dir() / TRIALS_DIR / str(trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("run_dir", str(run_dir))
        started = time.perf_counter()
        with (run_dir / TRIAL_LOG).open("wb") as log:
            process = subprocess.run(
                self.command(params, run_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(trial),
                preexec_fn=_die_with_parent,
            )
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        best, iteration = _run_result(run_dir)
        trial.set_user_attr("iterations", iteration)
        if process.returncode != 0:
            reason = _last_line(run_dir / TRIAL_LOG)
            trial.set_user_attr("error", reason)
            raise TrialFailed(f"trial {trial.number}: exit {process.returncode}: {reason}")
        if rundir.last_attempt(run_dir).get("outcome") == "pruned":
            raise optuna.TrialPruned(f"pruned at iteration {iteration}")
        if best is None:
            raise TrialFailed(f"trial {trial.number}: no validation ran ({run_dir})")
        return float(best)


def _run_result(run_dir: Path) -> tuple[float | None, int]:
    """The run's best validation value and the iteration of its last checkpoint."""
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    if not last.is_file():
        return None, 0
    try:
        payload = rundir.load(last)
    except UserError:
        return None, 0
    return (payload.get("best") or {}).get("value"), int(payload["iteration"])


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "no output"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_trials(study) -> list[int]:
    """Trials left RUNNING by a tuner on this host that is gone (killed, crashed): failed, and
    their parameters queued again. Returns their numbers."""
    from optuna.trial import TrialState

    host, reaped = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        where, _, pid = worker.rpartition(":")
        if where != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        reaped.append(trial.number)
    return reaped


def open_study(space: SearchSpace, options: TuneOptions):
    """Create the study, or load it (a rerun, another worker): its storage, TPE and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options.study_dir().mkdir(parents=True, exist_ok=True)
    heartbeat = None if options.storage_url().startswith(pruning.JOURNAL) else HEARTBEAT_S
    sampler_options = {k: v for k, v in space.sampler.items() if k != "type"}
    for attempt in range(3):  # two workers creating one SQLite file at once: one may lose
        try:
            storage = pruning.make_storage(options.storage_url(), heartbeat)
            return optuna.create_study(
                storage=storage,
                study_name=options.study,
                direction=space.direction,
                sampler=optuna.samplers.TPESampler(**sampler_options),
                pruner=pruning.make_pruner(space.pruner),
                load_if_exists=True,
            )
        except TypeError as err:
            raise UserError(f"{space.path}: sampler: {err} (options of TPESampler)") from None
        except ValueError as err:  # another study's direction under this name
            raise UserError(f"tune.study={options.study}: {err}") from None
        except Exception:  # noqa: BLE001 - SQLAlchemy's errors of a concurrent creation
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_tune(space: SearchSpace, options: TuneOptions, train_overrides: list[str]):
    """Fill the study to `options.trials` finished (complete or pruned) trials; returns it."""
    import optuna
    from optuna.trial import TrialState

    study = open_study(space, options)
    reaped = reap_dead_trials(study)
    if reaped:
        console.info(f"trials {reaped} were left running by a dead tuner: failed, queued again")
    save_tune_record(space, options, train_overrides)
    remaining = options.trials - finished_count(study)
    console.info(
        f"study {options.study} in {options.storage_url()}: {finished_count(study)} of "
        f"{options.trials} trials finished; {max(remaining, 0)} to run, {options.workers} at once"
    )
    if remaining > 0:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        study.optimize(
            TrialRunner(space, options, train_overrides),
            n_trials=remaining,
            n_jobs=options.workers,
            catch=(TrialFailed,),
            callbacks=[optuna.study.MaxTrialsCallback(options.trials, states=states)],
            gc_after_trial=False,
        )
    return study


def save_tune_record(space: SearchSpace, options: TuneOptions, train_overrides: list[str]):
    """`tune.json` in the study directory: how `mamlrun report` finds the storage and rebuilds
    the reproducing command (a storage URL with a password is written as given)."""
    import json

    from mamlrun.data.atomic import write_atomically

    record = {
        "study": options.study,
        "storage": options.storage_url(),
        "search": str(space.path),
        "metric": space.metric,
        "direction": space.direction,
        "train_overrides": train_overrides,
        "budget_overrides": space.budget_overrides(),
        "trials": options.trials,
    }
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(options.study_dir() / "tune.json", lambda f: f.write(text.encode()))
