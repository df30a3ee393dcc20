"""Sweeps on a real SLURM cluster through `hydra/launcher=slurm`: submitted with sbatch, their jobs'
SLURM ids in the run directories, requeued jobs that continue from their checkpoint to the weights
of an undisturbed run, and the one-line ends of a refused sweep, a cancelled job and a job that
fails on its node.

`make cluster-up` starts the cluster these tests use (scripts/cluster.sh: slurmctld, slurmd and
munge on this machine); SLURM_CONF, where set, names another. Without a cluster the tests are
skipped, and fail under CI=true, saying why. Marked `slurm`: `pytest -m slurm` runs them alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MAMLRUN, read_jsonl, run_mamlrun

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = ROOT / ".cluster" / "slurm.conf"  # written by `make cluster-up`

# A job of a few seconds; one CPU per job, so that two run at once on a 2-core machine (and
# hardware.threads=0, the default, must take that one CPU).
TINY = ["train.iterations=200", "eval.tasks=20", "logger=none", "print_config=false"]
ONE_CPU = ["hydra.launcher.cpus_per_task=1"]
# Long enough to be requeued after its first checkpoint, well before its end.
REQUEUED = [
    "train.iterations=2000",
    "train.checkpoint_every=200",
    "train.log_every=100",
    "train.val_every=1000",
    "train.val_tasks=20",
    "train.eval_at_end=false",
    "logger=none",
    "print_config=false",
    "hardware.threads=1",
]


def _unreachable(conf: str) -> str | None:
    """Why no cluster answers at `conf`, or None when its node takes jobs."""
    if not Path(conf).is_file():
        return f"{conf} does not exist"
    if shutil.which("sinfo") is None:
        return "SLURM's commands (sinfo) are not installed"
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        answer = subprocess.run(
            ["sinfo", "--noheader", "--format=%t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return f"sinfo with SLURM_CONF={conf} did not answer"
    if answer.returncode != 0:
        said = answer.stderr.strip().splitlines() or [f"exit status {answer.returncode}"]
        return f"sinfo with SLURM_CONF={conf}: {said[-1]}"
    states = set(answer.stdout.split())
    if not states & {"idle", "mix", "alloc"}:
        return f"no node of SLURM_CONF={conf} takes jobs (node states: {sorted(states)})"
    return None


@pytest.fixture(scope="session")
def cluster():
    """The cluster's SLURM_CONF, set for the session so that every mamlrun, sbatch and squeue the
    tests start (and the jobs, through sbatch's exported environment) find it."""
    conf = os.environ.get("SLURM_CONF") or str(LOCAL_CLUSTER)
    reason = _unreachable(conf)
    if reason is not None:
        message = f"no SLURM cluster: {reason}; start one with: make cluster-up"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if saved is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = saved


def _squeue(job: str) -> dict[str, tuple[str, str]]:
    """SLURM's own record of `job` once it has ended (an array's tasks, one line each):
    array-form id -> (the job id SLURM gave that task, its final state). A job whose result has
    come back may still be on its way out (RUNNING, COMPLETING) for a moment."""
    command = ["squeue", "--noheader", "--array", "--states=all", f"--jobs={job}"]
    deadline = time.monotonic() + 30
    while True:
        lines = subprocess.run(
            [*command, "--format=%i|%A|%T"], capture_output=True, text=True, check=True
        ).stdout.split()
        records = {name: (raw, state) for name, raw, state in (line.split("|") for line in lines)}
        ending = {state for _, state in records.values()} & {"RUNNING", "COMPLETING"}
        if not ending or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _attempts(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "job.json").read_text())["attempts"]


def _submitit_tasks(sweep: Path) -> dict[str, Path]:
    """submitit's folder of each array task (`<array id>_<task>`), by that name."""
    return {p.name: p for p in (sweep / ".submitit").iterdir() if "_" in p.name and p.is_dir()}


def _log(folder: Path) -> str:
    return "".join(path.read_text() for path in sorted(folder.glob("*_log.*")))


def test_a_sweep_runs_as_one_slurm_job_array_and_each_run_records_its_job(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    run_mamlrun(
        "train",
        "-m",
        "hydra/launcher=slurm",
        "seed=0,1,2",
        *TINY,
        *ONE_CPU,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=300,
    )
    tasks = _submitit_tasks(sweep)
    (array,) = {name.split("_")[0] for name in tasks}
    assert sorted(tasks) == [f"{array}_{num}" for num in range(3)], "one array of three tasks"
    slurm_says = _squeue(array)
    assert {name: state for name, (_, state) in slurm_says.items()} == dict.fromkeys(
        tasks, "COMPLETED"
    )
    for num in range(3):
        run = sweep / str(num)
        assert json.loads((run / "eval.json").read_text()), f"job {num} has no test results"
        state = torch.load(run / "checkpoints/last.pt", weights_only=True)
        assert state["config"]["seed"] == num and state["iteration"] == 200
        (attempt,) = _attempts(run)
        task = f"{array}_{num}"
        assert attempt["slurm"]["array_job_id"] == array
        assert attempt["slurm"]["array_task_id"] == str(num)
        assert attempt["slurm"]["job_id"] == slurm_says[task][0], "the id SLURM gave this task"
        assert attempt["threads"] == 1, "threads=0 takes the job's CPUs, not the node's"


def test_hydras_own_submitit_slurm_launcher_still_works(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    run_mamlrun(
        "train",
        "-m",
        "hydra/launcher=submitit_slurm",
        "seed=3",
        *TINY,
        *ONE_CPU,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=300,
    )
    (job,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert (sweep / "0" / "eval.json").is_file()
    (attempt,) = _attempts(sweep / "0")
    assert attempt["slurm"]["job_id"] == job and _squeue(job)[job] == (job, "COMPLETED")


def _start(args: list[str], cwd: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true"}
    with (cwd / f"{name}.log").open("w") as out:
        return subprocess.Popen([*MAMLRUN, *args], cwd=cwd, stdout=out, stderr=out, env=env)


def _first_attempt_once_checkpointed(run_dir: Path, deadline: float) -> dict:
    """The run's first attempt, as soon as it has written a checkpoint (still training)."""
    while time.monotonic() < deadline:
        if (run_dir / "checkpoints/last.pt").is_file() and (run_dir / "job.json").is_file():
            return _attempts(run_dir)[0]
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: no checkpoint in time")


def test_requeued_jobs_continue_from_their_checkpoint_to_an_undisturbed_runs_weights(
    cluster, tmp_path
):
    """Two jobs of one config (they differ in eval.tasks only, unused with eval_at_end=false): job 0
    is requeued by SLURM (`scontrol requeue`: SIGTERM, as for a preemption), job 1 gets submitit's
    time-limit signal (USR2: mamlrun checkpoints, then submitit's handler requeues the job).
    Both must end with the weights and metrics.jsonl of the same config trained without a break,
    here, at the same time."""
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]
    sweeping = _start(
        ["train", "-m", *launcher, "eval.tasks=10,20", *REQUEUED, f"hydra.sweep.dir={sweep}"],
        tmp_path,
        "sweep",
    )
    undisturbed = _start(["train", *REQUEUED, f"hydra.run.dir={reference}"], tmp_path, "ref")
    deadline = time.monotonic() + 120
    signals = {0: ["scontrol", "requeue"], 1: ["scancel", "--signal=USR2"]}
    job_ids = {}
    for num, command in signals.items():
        job_ids[num] = _first_attempt_once_checkpointed(sweep / str(num), deadline)["slurm"]
        # By array task: the raw id of an array's first-submitted task is the array's own id,
        # which scancel and scontrol take for the whole array.
        task = f"{job_ids[num]['array_job_id']}_{job_ids[num]['array_task_id']}"
        subprocess.run([*command, task], check=True)
    assert sweeping.wait(timeout=240) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    assert undisturbed.wait(timeout=120) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    final = torch.load(reference / "checkpoints/last.pt", weights_only=True)
    metrics = read_jsonl(reference / "metrics.jsonl")
    tasks = _submitit_tasks(sweep)
    for num, first in job_ids.items():
        run = sweep / str(num)
        attempts = _attempts(run)
        assert [a["slurm"]["job_id"] for a in attempts] == [first["job_id"]] * 2, attempts
        assert [a["slurm"]["restart_count"] for a in attempts] == [None, "1"]
        stopped_at = attempts[1]["start_iteration"]
        assert 0 < stopped_at < 2000, "the second attempt continues from the first's checkpoint"
        task = f"{first['array_job_id']}_{num}"
        log = _log(tasks[task])
        if num == 0:  # mamlrun's own exit: SLURM requeues the job
            assert f"stopped by SIGTERM after iteration {stopped_at:,};" in log
        else:  # mamlrun checkpoints, then its chained handler (submitit's) requeues the job
            assert "SIGUSR2: stopping after this iteration" in log
            assert f"Requeued job {task}" in log
        state = torch.load(run / "checkpoints/last.pt", weights_only=True)
        assert state["iteration"] == 2000
        for name, tensor in final["model"].items():
            assert torch.equal(state["model"][name], tensor), (num, name)
        assert read_jsonl(run / "metrics.jsonl") == metrics, num


def test_a_sweep_slurm_refuses_is_one_line(cluster, tmp_path):
    cpus = os.cpu_count() or 1
    result = run_mamlrun(
        "train",
        "-m",
        "hydra/launcher=slurm",
        *TINY,
        f"hydra.launcher.cpus_per_task={cpus * 64}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        expect_ok=False,
        timeout=120,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("mamlrun train: error: hydra/launcher=slurm: sbatch refused the sweep:")


def test_a_cancelled_job_ends_the_sweep_with_one_line_instead_of_waiting(cluster, tmp_path):
    """The cluster keeps no accounting (no sacct): the launcher must learn from squeue that the
    job is gone, or the sweep would wait for its result forever."""
    sweep = tmp_path / "sweep"
    waiting = _start(
        [
            "train",
            "-m",
            "hydra/launcher=slurm",
            "train.iterations=1000000",
            *TINY[1:],
            *ONE_CPU,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        "sweep",
    )
    deadline = time.monotonic() + 60
    while not sweep.joinpath(".submitit").is_dir() or not _jobs_in(sweep):
        assert time.monotonic() < deadline and waiting.poll() is None, "no job submitted"
        time.sleep(0.2)
    (job,) = _jobs_in(sweep)
    subprocess.run(["scancel", job], check=True)
    assert waiting.wait(timeout=120) == 2
    last = (tmp_path / "sweep.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"mamlrun train: error: hydra/launcher=slurm: SLURM job {job} ended")
    assert "(state CANCELLED" in last


def _jobs_in(sweep: Path) -> list[str]:
    return [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]


def test_a_job_that_fails_on_its_node_is_reported_in_the_sweeps_terminal(cluster, tmp_path):
    result = run_mamlrun(
        "train",
        "-m",
        "hydra/launcher=slurm",
        "model=conv4_omniglot",  # refused by validation on sinusoid, inside the SLURM job
        *TINY,
        *ONE_CPU,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        expect_ok=False,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-2].startswith("mamlrun train: error in job 0 (model=conv4_omniglot")
    assert "needs an image dataset" in lines[-2]
    assert "sweep job(s) 0 failed" in lines[-1]


def test_a_two_task_job_trains_one_run_data_parallel(cluster, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: submitit starts the job's two tasks with srun, they
    rendezvous on the job's node and train one run; rank 0 alone writes it (one attempt in
    job.json, world size 2; task 1 writes nothing into the run's Hydra log)."""
    sweep = tmp_path / "sweep"
    run_mamlrun(
        "train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "algorithm.meta_batch_size=8",
        "hardware.threads=1",
        *TINY,
        *ONE_CPU,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=300,
    )
    (job,) = _jobs_in(sweep)
    assert _squeue(job)[job] == (job, "COMPLETED")
    run = sweep / "0"
    assert json.loads((run / "eval.json").read_text())["tasks"] == 20
    (attempt,) = _attempts(run)
    assert attempt["world_size"] == 2 and attempt["slurm"]["job_id"] == job
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert state["iteration"] == 200 and state["world_size"] == 2
    logs = sweep / ".submitit" / job
    assert {p.name for p in logs.glob("*_log.out")} == {f"{job}_0_log.out", f"{job}_1_log.out"}
    assert "Traceback" not in (logs / f"{job}_1_log.err").read_text()
    assert (run / "train.log").read_text().count("Job completed successfully") == 1
