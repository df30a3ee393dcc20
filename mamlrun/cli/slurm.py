"""What `hydra/launcher=slurm` (its class: hydra_plugins/mamlrun_launchers) adds for SLURM itself:
job states that stay true on a cluster without accounting, and SLURM's refusals as one line.

submitit learns a job's state from `sacct`. On a cluster without accounting
(`AccountingStorageType=accounting_storage/none`, no slurmdbd: small lab clusters, the one
`make cluster-up` starts), `sacct` fails at every poll: submitit logs a warning each time and
never learns that a job ended, so a job that ends without writing its result (cancelled, killed
at its time limit, its node lost) would leave the sweep waiting forever. There, submitit reads the
states from `squeue` instead, which keeps each finished job for the cluster's `MinJobAge` (300 s
by default). A cluster with accounting is polled through `sacct`, as submitit does.

Where SLURM refuses the sweep (no cluster here, a partition or size it cannot give) or a job ends
without a result, the sweep ends with one line saying so instead of submitit's traceback. A job's
own error line, written on its node to its SLURM log, is repeated in the sweep's terminal.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm import slurm

from mamlrun.cli.launchers import FailedJob
from mamlrun.errors import UserError

# squeue's poll interval at most, in seconds: well inside the default MinJobAge, so a job is not
# purged from squeue before the launcher has seen it end.
SQUEUE_DELAY_S = 60


def read_job_states_from_squeue_without_accounting() -> None:
    """Where the cluster keeps no accounting, make this process's submitit SLURM jobs poll squeue.

    submitit keeps one state watcher for all its SLURM jobs, as a class attribute of `SlurmJob`
    (job arrays are built as `SlurmJob` whatever executor submits them): replacing it is the one
    place to change how states are read.
    """
    if not accounting_enabled() and not isinstance(slurm.SlurmJob.watcher, SqueueWatcher):
        slurm.SlurmJob.watcher = SqueueWatcher(delay_s=SQUEUE_DELAY_S)


def accounting_enabled() -> bool:
    """Whether the cluster keeps job accounting (sacct has data); True where it cannot be told."""
    try:
        config = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return "accounting_storage/none" not in config


class SqueueWatcher(slurm.SlurmInfoWatcher):
    """submitit's SLURM state watcher, reading `squeue` in the format it reads from `sacct`."""

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()  # sacct ... -j ID -j ID: the jobs still to check
        if command is None:
            return None
        ids = [command[i + 1] for i, part in enumerate(command) if part == "-j"]
        return [
            "squeue",
            "--noheader",
            "--array",  # one line per array task, as sacct prints them
            "--states=all",  # ended jobs too, while the controller keeps them
            f"--jobs={','.join(sorted(ids))}",
            "--format=%i|%T|%N",
        ]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if isinstance(string, bytes):
            string = string.decode()
        return super().read_info("JobID|State|NodeList\n" + string)


@contextlib.contextmanager
def errors_as_one_line() -> Iterator[None]:
    """SLURM's refusals and jobs that ended without a result as a UserError (one line, exit 2).

    A job whose task raised keeps submitit's error, with the job's traceback: that is a bug to
    read, not a setting to fix.
    """
    try:
        yield
    except FailedJobError as err:
        cause = err.__cause__
        if not (isinstance(cause, subprocess.CalledProcessError) and cause.cmd[0] == "sbatch"):
            raise
        reason = (cause.stderr or "").strip().splitlines() or [f"exit status {cause.returncode}"]
        raise UserError(
            f"hydra/launcher=slurm: sbatch refused the sweep: {reason[-1]} (check the "
            "hydra.launcher keys partition, cpus_per_task, mem_gb, timeout_min and that the "
            "cluster answers: sinfo; one on this machine: make cluster-up)"
        ) from None
    except UncompletedJobError as err:
        raise UserError(_ended_without_result(str(err))) from None
    except RuntimeError as err:
        if "srun" not in str(err):
            raise
        raise UserError(
            "hydra/launcher=slurm: no SLURM here (srun not found); run the sweep on a "
            "cluster's login node, or start one on this machine: make cluster-up"
        ) from None


def _ended_without_result(message: str) -> str:
    """submitit's several lines on a job without a result pickle, as one line."""
    pattern = r"Job (\S+) .*? with path (\S+)\s+has not .*?\(state: ([^)]*)\)"
    found = re.search(pattern, message, re.S)
    if found is None:
        return "hydra/launcher=slurm: " + " ".join(message.splitlines()[:2])
    job, result, state = found.groups()
    return (
        f"hydra/launcher=slurm: SLURM job {job} ended without a result (state {state}); its "
        f"logs are in {Path(result).parent}/, and the other jobs' run directories are kept"
    )


def print_failed_jobs(returns: Sequence[JobReturn]) -> None:
    """Each failed job's line (`mamlrun train: error in job N (overrides): why`), which the job
    printed on its node into its SLURM log, here too: the sweep's last line points above."""
    for job in returns:
        if job.status == JobStatus.COMPLETED and isinstance(job.return_value, FailedJob):
            failed = job.return_value
            overrides = " ".join(job.overrides or [])
            print(
                f"{sys.argv[0]}: error in job {failed.num} ({overrides}): {failed.message}",
                file=sys.stderr,
            )
