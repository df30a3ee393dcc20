"""`mamlrun tune` end to end: real Optuna studies on real SQLite files, trials as real `mamlrun
train` processes, tuners killed with SIGKILL.

The trials are tiny sinusoid runs (a few hundred iterations, validation every few dozen) and the
sampler draws at random throughout (`n_startup_trials` above the trial count), so which values are
tried is fixed by the seed while the pruner still sees trials both better and worse than the
median.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_slurm import _attempts, cluster  # noqa: F401 - the SLURM cluster fixture

from conftest import MAMLRUN, read_jsonl, run_mamlrun
from mamlrun.analysis.runs import PRUNED, load_run
from mamlrun.cli import main
from mamlrun.run import rundir

BUDGET = 200
SEARCH = {
    "params": {
        "algorithm.inner_lr": {"type": "log_float", "low": 1.0e-4, "high": 0.3},
        "algorithm.meta_lr": {"type": "log_float", "low": 1.0e-6, "high": 3.0e-2},
    },
    "objective": "val",
    "budget": {
        "train.iterations": BUDGET,
        "train.val_every": 20,
        "train.checkpoint_every": 20,
        "train.log_every": 20,
        "train.eval_at_end": False,
    },
    "trials": 6,
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 100},
    "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 20},
}
TRAIN = ["train.val_tasks=20", "logger=none", "print_config=false", "hardware.threads=1"]


def write_search(folder: Path, name: str = "tiny", **changes) -> Path:
    spec = {**SEARCH, **changes}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tune_args(search: Path, study: str, trials: int, workers: int = 1) -> list[str]:
    return [
        "tune",
        f"search={search}",
        f"tune.study={study}",
        f"tune.trials={trials}",
        f"tune.workers={workers}",
        *TRAIN,
    ]


def load(cwd: Path, study: str) -> optuna.Study:
    storage = f"sqlite:///{cwd / 'outputs' / 'tune' / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=storage)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def start_tuner(cwd: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.Popen(
        [*MAMLRUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_study_reports_best_and_its_command_reproduces_it(tmp_path):
    """4 trials, 2 at once: the study ends with 4 finished trials, pruned ones stopped early
    and counted (the 4th draw's meta_lr, 5.8e-6, learns nothing); best.yaml's command trains
    the same value again."""
    search = write_search(tmp_path)
    result = run_mamlrun(*tune_args(search, "s", trials=4, workers=2), cwd=tmp_path, timeout=300)
    study = load(tmp_path, "s")
    done = finished(study)
    assert len(done) == 4 and not study.get_trials(states=(TrialState.FAIL,))
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    for trial in pruned:  # stopped early: fewer validations logged than the budget holds
        rows = read_jsonl(Path(trial.user_attrs["run_dir"]) / rundir.METRICS)
        assert trial.user_attrs["iterations"] == rows[-1]["iteration"] < BUDGET
        assert rundir.last_attempt(Path(trial.user_attrs["run_dir"]))["outcome"] == "pruned"
    assert f"{len(pruned)} pruned" in result.stderr + result.stdout
    study_dir = tmp_path / "outputs" / "tune" / "s"
    for name in ("trials.csv", "history.png", "importances.png", "slice.png"):
        assert (study_dir / name).stat().st_size > 0, name
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["value"] == min(t.value for t in done if t.state == TrialState.COMPLETE)
    command = best["command"].split()
    assert command[:2] == ["mamlrun", "train"] and not any("tune" in w for w in command)
    again = tmp_path / "again"
    run_mamlrun(*command[1:], f"hydra.run.dir={again}", cwd=tmp_path)
    assert rundir.load(rundir.checkpoint_path(again))["best"]["value"] == best["value"]
    (study_dir / "best.yaml").unlink()
    main(["report", str(study_dir)])  # in this process: it reads the storage, runs nothing
    assert yaml.safe_load((study_dir / "best.yaml").read_text()) == best
    assert load_run(Path(pruned[0].user_attrs["run_dir"])).status == PRUNED  # not failed


def test_two_tuner_processes_fill_one_study_without_loss_or_duplicates(tmp_path):
    """Two `mamlrun tune` processes on one SQLite study: each trial ran once, in its own run
    directory, by one of the two; none failed; the study stops at its count (or one over, when
    both start their last trial at the same moment)."""
    search = write_search(tmp_path)
    args = tune_args(search, "shared", trials=4)
    tuners = [start_tuner(tmp_path, args) for _ in range(2)]
    outputs = [tuner.communicate(timeout=300)[0].decode() for tuner in tuners]
    assert [t.returncode for t in tuners] == [0, 0], outputs
    trials = load(tmp_path, "shared").get_trials()
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), trials
    assert 4 <= len(trials) <= 5
    dirs = sorted((tmp_path / "outputs" / "tune" / "shared" / "trials").iterdir())
    assert sorted(int(d.name) for d in dirs) == sorted(t.number for t in trials)
    for trial in trials:  # trained once: one attempt, by the worker the trial names
        attempts = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / rundir.JOB).read_text())
        assert len(attempts["attempts"]) == 1
    assert len({t.user_attrs["worker"] for t in trials}) == 2


def test_killed_tuner_then_the_same_command_continues_the_study(tmp_path):
    """kill -9 of the tuner mid-trial: its trial process dies too; the rerun keeps every
    finished trial, fails the killed one and retries its parameters, and ends at the count."""
    search = write_search(tmp_path)
    args = tune_args(search, "k", trials=3)
    tuner = start_tuner(tmp_path, args)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not (tmp_path / "outputs" / "tune" / "k" / "tune.json").is_file():
            continue  # the study is not created yet
        trials = load(tmp_path, "k").get_trials()  # one snapshot: a trial may end between reads
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if done and running and "run_dir" in running[0].user_attrs:
            break
    else:
        pytest.fail("the tuner never reached its second trial")
    time.sleep(1.0)  # into the trial's training
    tuner.send_signal(signal.SIGKILL)
    tuner.wait(timeout=30)
    killed = running[0]
    kept = {t.number: (t.value, t.params) for t in finished(load(tmp_path, "k"))}
    time.sleep(1.0)
    assert rundir.holder(Path(killed.user_attrs["run_dir"])) is None  # no orphan trial left
    result = run_mamlrun(*args, cwd=tmp_path, timeout=300)
    assert "queued again" in result.stderr + result.stdout
    study = load(tmp_path, "k")
    assert {t.number: (t.value, t.params) for t in finished(study) if t.number in kept} == kept
    assert len(finished(study)) == 3
    assert study.trials[killed.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ({"algorithm.inner_lrr": {"type": "float", "low": 0.1, "high": 1.0}}, "inner_lrr"),
        ({"algorithm.inner_lr": {"type": "float", "low": 1.0, "high": 0.1}}, "swap them"),
        ({"algorithm.meta_lr": {"type": "log_float", "low": 0.0, "high": 0.1}}, "above 0"),
        ({"algorithm.meta_batch_size": {"type": "int", "low": 0, "high": 8}}, "meta_batch_size"),
    ],
)
def test_bad_search_files_are_one_line_before_any_trial(
    tmp_path, monkeypatch, capsys, param, expected
):
    """In this process (the check is before any trial, so there is nothing to start): exit 2,
    one line naming the file and the key, no study created."""
    search = write_search(tmp_path, params=param)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(tune_args(search, "bad", trials=2))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamlrun tune: error: ") and expected in lines[0]
    assert str(search) in lines[0]
    assert not (tmp_path / "outputs").exists()  # no study, no trial


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_trials_as_slurm_jobs_report_to_the_study(tmp_path):
    """hydra/launcher=slurm on the tune command line: each trial is a SLURM job (its job.json
    names the job) that reports its validation curve to the study from the node."""
    search = write_search(tmp_path)
    launcher = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]
    run_mamlrun(*tune_args(search, "sl", trials=3, workers=2), *launcher, cwd=tmp_path)
    trials = finished(load(tmp_path, "sl"))
    assert len(trials) == 3
    for trial in trials:
        attempt = _attempts(Path(trial.user_attrs["run_dir"]))[-1]
        assert attempt["slurm"] and attempt["slurm"]["job_id"]
        rows = read_jsonl(Path(trial.user_attrs["run_dir"]) / rundir.METRICS)
        validations = [r["iteration"] for r in rows if r["split"] == "val"]
        assert sorted(trial.intermediate_values) == validations
