"""`mamlrun train` and `mamlrun eval` as Hydra apps: `@hydra.main`, its errors as one line, and the
argument rewriting Hydra cannot do itself (`experiment=glob(...)` over the presets, `resume=`).

Every Hydra flag keeps working after the subcommand (`-m`, `--cfg job`, `--help`, `--info`, sweeps,
launchers).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from mamlrun.errors import UserError, fail


def _config_path() -> str:
    """The installed configs (`mamlrun.conf`), or the checkout's `conf/` when mamlrun runs from a
    source tree that is not installed (`python -m mamlrun` inside the repository)."""
    from mamlrun.config.compose import SOURCE_CONF_DIR, configs_installed

    return "pkg://mamlrun.conf" if configs_installed() else str(SOURCE_CONF_DIR)


def _hydra_command(config_name: str, task: Callable) -> Callable[[], None]:
    """A zero-argument entry point running `task(cfg)` under `@hydra.main`.

    A UserError is one readable line and exit status 2 (128 + the signal for a run stopped by
    one). In a `-m` sweep it ends only its own job: the job returns a `FailedJob` (NaN: sweepers
    such as Optuna record a failed trial), the other jobs run, and the command exits non-zero at
    the end, naming the jobs that failed. A job stopped by a signal outside a worker pool ends its
    process instead: the rest of a sequential sweep should not start, and a SLURM job must leave
    no result behind, so that its requeued run continues it.
    """

    def task_function(cfg):
        try:
            return task(cfg)
        except UserError as err:
            from hydra.core.hydra_config import HydraConfig

            from mamlrun.cli.launchers import FAILURES, FailedJob, runs_in_worker_pool

            job, code = HydraConfig.get(), getattr(err, "exit_code", 2)
            if job.mode.name != "MULTIRUN":
                fail(config_name, str(err), code)
            overrides = " ".join(job.overrides.task)
            line = f"error in job {job.job.num} ({overrides}): {err}"
            if code != 2 and not runs_in_worker_pool(job.launcher._target_):
                fail(config_name, line, code)
            print(f"mamlrun {config_name}: {line}", file=sys.stderr)
            sweep_dir = str(Path(job.sweep.dir).resolve())
            FAILURES[job.job.num] = FailedJob(job.job.num, str(err), code, sweep_dir)
            return FAILURES[job.job.num]

    def entry() -> None:
        import hydra

        from mamlrun.cli.launchers import FAILURES

        _register_launchers()
        app = hydra.main(config_path=_config_path(), config_name=config_name, version_base="1.3")
        with _hydra_errors_as_one_line(config_name):
            app(task_function)()
        if FAILURES:
            numbers = ", ".join(str(num) for num in sorted(FAILURES))
            code = max(job.exit_code for job in FAILURES.values())
            if all(job.exit_code != 2 for job in FAILURES.values()):
                sweep_dir = next(iter(FAILURES.values())).sweep_dir
                fail(
                    config_name,
                    f"sweep stopped by a signal: job(s) {numbers} wrote checkpoints/last.pt; to "
                    f"continue them, run the same command with hydra.sweep.dir={sweep_dir}",
                    code,
                )
            fail(
                config_name,
                f"sweep job(s) {numbers} failed (see their lines above); the other jobs finished",
                code,
            )

    return entry


def _register_launchers() -> None:
    """mamlrun's launchers (`hydra/launcher=parallel|slurm`). Hydra finds plugins by walking the
    `hydra_plugins` package on disk, which misses an editable install's (`make install`)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.mamlrun_launchers import mamlrun_launchers

    for launcher in (mamlrun_launchers.ParallelLauncher, mamlrun_launchers.SlurmLauncher):
        Plugins.instance().register(launcher)


@contextlib.contextmanager
def _hydra_errors_as_one_line(command: str) -> Iterator[None]:
    """Hydra reports a bad override (unknown key or option, a value that does not parse) in
    several lines and exits 1; asked to raise it instead (HYDRA_FULL_ERROR=1 while its app runs),
    it becomes our one line, exit 2. A user's own HYDRA_FULL_ERROR=1 still shows Hydra's error."""
    from hydra.errors import CompactHydraException

    from mamlrun.config.compose import error_line

    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as err:
        if full_error == "1":
            raise
        fail(command, error_line(err))
    except UserError as err:  # a launcher's (SLURM refused the sweep); a job's: task_function
        fail(command, str(err), getattr(err, "exit_code", 2))
    except ValueError as err:  # Hydra's own flags combined wrongly (`-m --cfg job`)
        if full_error == "1" or not str(err).startswith("Only one of"):
            raise
        fail(command, str(err))
    except OSError as err:  # a path it cannot use (hydra.run.dir, a full disk): no traceback
        if err.filename is None or full_error == "1":
            raise
        fail(
            command,
            f"{err.filename}: {err.strerror} (check the path, its permissions and free "
            "space; finished checkpoints and results are kept)",
        )
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def _train(cfg):
    from mamlrun.run.train import run_train

    return run_train(cfg)


def _eval(cfg):
    from mamlrun.run.evaluation import run_eval

    return run_eval(cfg)


def _with_argv(name: str, entry: Callable[[], None]) -> Callable[[list[str]], None]:
    """Hydra parses sys.argv itself: hand it the arguments after the subcommand."""

    def run(args: list[str]) -> None:
        if name == "train":
            try:
                args = [_expand_experiment(arg) for arg in args]
                args = args + _resume_overrides(args) + _rank_overrides(args)
            except UserError as err:
                fail(name, str(err))
        sys.argv = [f"mamlrun {name}", *args]
        entry()

    return run


def _expand_experiment(arg: str) -> str:
    """`experiment=glob(finn2017/omniglot_*)` as the list of presets it matches, and any other
    `experiment=` value checked against the presets: Hydra sees only the group's top folder,
    where there are none, so its glob would launch 0 jobs and its error list no choices."""
    key, _, value = arg.partition("=")
    if key.lstrip("+") != "experiment" or value in ("", "null"):
        return arg
    from hydra.core.override_parser.types import Glob

    from mamlrun.config.compose import experiment_presets, parse_overrides

    presets = experiment_presets()
    override = parse_overrides([arg])[0].parsed
    choices = f"choose from {', '.join(presets)}"
    value = override.value()
    if isinstance(value, Glob):
        matched = value.filter(presets)
        if not matched:
            raise UserError(f"{arg}: matches no experiment preset ({choices})")
        return f"{key}={','.join(matched)}"
    if override.is_sweep_override():
        names = list(override.sweep_string_iterator())
    else:
        names = [override.get_value_element_as_str()]
    unknown = [name for name in names if name not in presets]
    if unknown:
        raise UserError(f"{key}={unknown[0]}: no such experiment preset ({choices})")
    return arg


def _resume_overrides(args: list[str]) -> list[str]:
    """`resume=<run dir or .pt>` continues inside that run's directory: point Hydra there, and keep
    the run's original `.hydra/` files instead of overwriting them with this command's."""
    from mamlrun.config.compose import parse_overrides

    # Only these two are read here: Hydra itself reports any other argument it cannot parse.
    given = parse_overrides([a for a in args if a.startswith(("resume=", "hydra.run.dir="))])
    resume = [o.value_text for o in given if o.key == "resume"]
    run_dir_given = any(o.key == "hydra.run.dir" for o in given)
    if not resume or resume[-1] in ("", "null", "auto") or run_dir_given:
        return []
    target = Path(resume[-1]).expanduser()
    if target.is_file():
        from mamlrun.run.rundir import run_dir_of

        target = run_dir_of(target)
    if not target.is_dir():
        return []  # run_train reports the missing checkpoint with a clear message
    return [f"hydra.run.dir={target.resolve()}", "hydra.output_subdir=null"]


def _rank_overrides(args: list[str]) -> list[str]:
    """A data-parallel rank other than 0 writes nothing in the run directory, Hydra's log file
    included (`mamlrun.run.distributed`), unless the command line picks Hydra's logging itself."""
    from mamlrun.run.distributed import detect

    if detect().is_main or any(a.lstrip("+~").startswith("hydra/job_logging") for a in args):
        return []
    return ["hydra/job_logging=disabled"]


train_command = _with_argv("train", _hydra_command("train", _train))
eval_command = _with_argv("eval", _hydra_command("eval", _eval))
