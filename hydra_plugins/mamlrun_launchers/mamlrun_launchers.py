"""mamlrun's launchers as Hydra plugins: `hydra/launcher=parallel` and `hydra/launcher=slurm`
(`conf/hydra/launcher/`). Hydra instantiates a launcher only from a class defined under the
`hydra_plugins` package, so the classes are here and what they add is in `mamlrun.cli.launchers`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)

from mamlrun.cli.launchers import (
    pool_size,
    record_failures,
    waiting_on_ctrl_c,
    with_concurrency,
)


class ParallelLauncher(JoblibLauncher):
    """Hydra's joblib launcher; `n_jobs` jobs at once (-1: one per core), sharing the cores."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        running = pool_size(self.joblib.get("n_jobs"), len(job_overrides))
        with waiting_on_ctrl_c():
            returns = super().launch(with_concurrency(job_overrides, running), initial_job_idx)
        record_failures(returns)
        return returns


class SlurmLauncher(SubmititSlurmLauncher):
    """Hydra's submitit SLURM launcher; a job's failure reason comes back to the sweep, job states
    come from squeue on a cluster without accounting, and SLURM's refusals are one line
    (`mamlrun.cli.slurm`, imported here only when a sweep is launched: it imports submitit)."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from mamlrun.cli import slurm

        slurm.read_job_states_from_squeue_without_accounting()
        with slurm.errors_as_one_line():
            returns = super().launch(job_overrides, initial_job_idx)
        record_failures(returns)
        slurm.print_failed_jobs(returns)
        return returns
