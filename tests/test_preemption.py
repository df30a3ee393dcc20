"""Preemption-safe training, as a cluster or a user stops it: real `mamlrun train` processes sent
SIGINT, SIGTERM or SIGUSR2 mid-training, then the same command run again (`resume=auto`).

- the stopped run writes `checkpoints/last.pt` for the iteration it was in (periodic checkpoints
  are off here, so only the signal can have written it), exits 128 + signal with one line and no
  traceback; the same command again continues it to final weights identical to a run never
  stopped, and `job.json` lists both attempts;
- a second Ctrl-C aborts at once; a finished run is not retrained; a directory holding another
  config's checkpoint is refused and left as it was;
- `hydra/launcher=parallel`: the jobs share the cores, a failed job fails the sweep's exit
  status, and Ctrl-C to the sweep's process group checkpoints every job, which the same command
  run again continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MAMLRUN, read_jsonl, run_mamlrun

ITERATIONS = 1000
RUN = [
    "print_config=false",
    "logger=none",
    f"train.iterations={ITERATIONS}",
    "train.log_every=20",
    "train.val_every=100000",  # at the end only
    "train.checkpoint_every=100000",  # at the end only: a mid-run last.pt is the signal's
    "train.val_tasks=20",
    "eval.tasks=20",
    "eval.plot_tasks=1",
    "hardware.threads=1",
]


def _start(args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*MAMLRUN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def _wait_for_training(run_dirs: list[Path], process: subprocess.Popen, timeout=120) -> None:
    """Until every run has logged a training row (the loop is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = [d / "metrics.jsonl" for d in run_dirs]
        if all(m.is_file() and m.stat().st_size > 0 for m in metrics):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"training did not start in {timeout} s")


def _iteration(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["iteration"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("uninterrupted")
    run_mamlrun("train", *RUN, "hydra.run.dir=run", cwd=work)
    return work / "run"


# SIGUSR2 in a SLURM job, chained to submitit's requeue: tests/test_slurm.py
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2])
def test_a_signal_checkpoints_the_iteration_and_the_same_command_continues_it(
    signum, uninterrupted, tmp_path
):
    args = ["train", *RUN, "hydra.run.dir=run"]
    run_dir = tmp_path / "run"
    process = _start(args, tmp_path)
    _wait_for_training([run_dir], process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(f"mamlrun train: stopped by {signal.Signals(signum).name} after iteration ")
    )
    stopped_at = _iteration(run_dir)
    assert 0 < stopped_at < ITERATIONS
    assert f"after iteration {stopped_at:,};" in stderr
    assert not (run_dir / "eval.json").exists()

    result = run_mamlrun(*args, cwd=tmp_path)  # the same command: resume=auto
    assert f"from iteration {stopped_at}" in result.stdout
    assert _iteration(run_dir) == ITERATIONS
    _assert_same_weights(run_dir, uninterrupted)
    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert [a["start_iteration"] for a in attempts] == [0, stopped_at]
    assert attempts[0]["pid"] != attempts[1]["pid"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_iterations = [r["iteration"] for r in rows if r["split"] == "train"]
    assert train_iterations == list(range(20, ITERATIONS + 1, 20))  # none twice, none missing


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    # an iteration of seconds (a huge meta-batch): the first Ctrl-C alone would wait for it
    slow = [*RUN, "algorithm.meta_batch_size=40000", "train.log_every=1"]
    process = _start(["train", *slow, "hydra.run.dir=run"], tmp_path)
    _wait_for_training([tmp_path / "run"], process, timeout=300)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "mamlrun train: aborted (KeyboardInterrupt)"
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "run").rglob("*.tmp"))


def _digest(run_dir: Path) -> dict[str, str]:
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".mamlrun.lock"]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_finished_run_is_not_retrained_and_another_config_is_refused(uninterrupted, tmp_path):
    work = uninterrupted.parent
    before = _digest(uninterrupted)
    again = run_mamlrun("train", *RUN, "hydra.run.dir=run", cwd=work)
    assert "already finished" in again.stdout
    assert _digest(uninterrupted) == before

    other = run_mamlrun(
        "train", *RUN, "algorithm.inner_lr=0.02", "hydra.run.dir=run", cwd=work, expect_ok=False
    )
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in other.stderr
    assert "checkpoints/last.pt: a checkpoint of another run (algorithm.inner_lr=0.01" in line[0]
    assert "resume=null" in line[0]
    assert _digest(uninterrupted) == before  # .hydra/ included: it still describes the run


def test_resume_null_trains_anew_in_a_directory_holding_a_run(tmp_path):
    args = ["train", *RUN, "train.iterations=100", "hydra.run.dir=run"]
    run_mamlrun(*args, cwd=tmp_path)
    first = (tmp_path / "run/eval.json").stat().st_mtime_ns
    again = run_mamlrun(*args, "resume=null", "seed=4", cwd=tmp_path)
    assert "already finished" not in again.stdout and "resuming" not in again.stdout
    assert (tmp_path / "run/eval.json").stat().st_mtime_ns > first
    assert "seed=4" in (tmp_path / "run/.hydra/overrides.yaml").read_text()
    (attempt,) = json.loads((tmp_path / "run/job.json").read_text())["attempts"]
    assert attempt["start_iteration"] == 0


SWEEP = [*RUN[:-1], "hydra/launcher=parallel", "hydra.sweep.dir=sweep"]


def test_parallel_jobs_share_the_cores_and_a_failed_job_fails_the_sweep(tmp_path):
    cores = len(os.sched_getaffinity(0))
    args = ["train", "-m", *SWEEP, "train.iterations=40", "algorithm.inner_lr=0.01,-1"]
    result = run_mamlrun(*args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mamlrun train: error: sweep job(s) 1 failed")
    assert "algorithm.inner_lr" in result.stderr
    (attempt,) = json.loads((tmp_path / "sweep/0/job.json").read_text())["attempts"]
    assert attempt["threads"] == max(1, cores // 2)  # two jobs at once
    assert (tmp_path / "sweep/0/eval.json").is_file()

    alone = ["train.iterations=40", "seed=3", "hydra.sweep.dir=alone"]
    run_mamlrun("train", "-m", *SWEEP, *alone, cwd=tmp_path)
    (attempt,) = json.loads((tmp_path / "alone/0/job.json").read_text())["attempts"]
    assert attempt["threads"] == cores  # alone: every core


def test_ctrl_c_checkpoints_every_parallel_job_and_the_sweep_continues(tmp_path):
    args = ["train", "-m", *SWEEP, "seed=0,1"]
    jobs = [tmp_path / "sweep/0", tmp_path / "sweep/1"]
    process = _start(args, tmp_path, new_session=True)  # its own process group, as a terminal's
    _wait_for_training(jobs, process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mamlrun train: sweep stopped by a signal: job(s) 0, 1 wrote")
    assert last.endswith(f"hydra.sweep.dir={(tmp_path / 'sweep').resolve()}")
    stopped = [_iteration(job) for job in jobs]
    assert all(0 < it < ITERATIONS for it in stopped), stopped

    run_mamlrun(*args, cwd=tmp_path)
    for job, at in zip(jobs, stopped, strict=True):
        assert _iteration(job) == ITERATIONS
        assert (job / "eval.json").is_file()
        attempts = json.loads((job / "job.json").read_text())["attempts"]
        assert [a["start_iteration"] for a in attempts] == [0, at]
