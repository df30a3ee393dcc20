"""What mamlrun's Hydra launchers add to Hydra's (`hydra/launcher=parallel` over joblib, `=slurm`
over submitit). The launcher classes themselves live in `hydra_plugins/mamlrun_launchers/`
(Hydra instantiates launchers only from the `hydra_plugins` package); the logic is here.

Each is Hydra's own launcher plus two things a sweep of training runs needs:

- jobs that run at once share the cores: every job learns how many run beside it
  (`MAMLRUN_CONCURRENT_JOBS`, set through `hydra.job.env_set`), and a job whose
  `hardware.threads` is 0 takes its share (`mamlrun.run.runtime.default_threads`);
- a job that fails on bad input or stops on a signal returns a `FailedJob` (NaN to a sweeper, so
  the other jobs go on) that carries its reason back to the sweep's own process, wherever the job
  ran, so `mamlrun train -m` exits non-zero naming it.

On Ctrl-C the parallel launcher's own process waits: the jobs (same terminal, same signal) each
finish their iteration and write `checkpoints/last.pt`; a second Ctrl-C aborts. Running the same
sweep again continues every job (`resume=auto`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from mamlrun import console

CONCURRENT_JOBS = "MAMLRUN_CONCURRENT_JOBS"

# Failed jobs of this process's sweep by job number: filled by the job itself where it runs in
# this process (Hydra's basic launcher), else from the results mamlrun's launchers receive.
FAILURES: dict[int, FailedJob] = {}


class FailedJob(float):
    """A NaN that says why sweep job `num` failed, and the exit status it asks for."""

    num: int
    message: str
    exit_code: int

    def __new__(cls, num: int, message: str, exit_code: int = 2) -> FailedJob:
        job = super().__new__(cls, "nan")
        job.num, job.message, job.exit_code = num, message, exit_code
        return job

    def __reduce__(self) -> tuple[Any, ...]:  # back from a worker process or a SLURM job
        return (FailedJob, (self.num, self.message, self.exit_code))


def record_failures(returns: Sequence[JobReturn]) -> None:
    for job in returns:
        if job.status == JobStatus.COMPLETED and isinstance(job.return_value, FailedJob):
            FAILURES[job.return_value.num] = job.return_value


def _logical_cores() -> int:
    return len(os.sched_getaffinity(0))


def pool_size(n_jobs: int | None, jobs: int) -> int:
    """How many of `jobs` joblib runs at once for its `n_jobs` (negative: cores + 1 + n_jobs)."""
    n_jobs = -1 if n_jobs is None else int(n_jobs)
    if n_jobs < 0:
        n_jobs = max(1, _logical_cores() + 1 + n_jobs)
    return max(1, min(n_jobs, jobs))


def with_concurrency(job_overrides: Sequence[Sequence[str]], running: int) -> list[list[str]]:
    """Each job's overrides plus the environment variable that tells it `running` (a Hydra
    override: it is not one of the job's own task overrides, `.hydra/overrides.yaml`)."""
    env = f"++hydra.job.env_set.{CONCURRENT_JOBS}={running}"
    return [[*overrides, env] for overrides in job_overrides]


@contextlib.contextmanager
def waiting_on_ctrl_c() -> Iterator[None]:
    """The first SIGINT leaves the jobs to stop themselves (each checkpoints); the second
    raises KeyboardInterrupt here, as usual."""
    asked = False

    def request(signum: int, frame: Any) -> None:
        nonlocal asked
        if asked:
            raise KeyboardInterrupt
        asked = True
        console.info(
            "SIGINT: every job stops after its iteration, with a checkpoint; waiting for them "
            "(Ctrl-C again to abort at once)"
        )

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def runs_in_worker_pool(launcher_target: str) -> bool:
    """Jobs of this launcher share one pool of worker processes (joblib's): a job stopped by a
    signal must end as a failed job there, not end its worker process."""
    return "joblib" in launcher_target.lower() or launcher_target.endswith(".ParallelLauncher")
