"""The `mamlrun` console script: `mamlrun <subcommand> [hydra overrides and flags]`.

Dispatch only, no ML logic. Hydra subcommands (`train`, `eval`) go through `@hydra.main`, so every
Hydra flag keeps working after the subcommand (`-m`, `--cfg job`, `--help`, `--info`, sweeps,
launchers). New subcommands are one entry in `COMMANDS`.
"""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mamlrun.errors import UserError


def _fail(command: str, message: str) -> NoReturn:
    """End the command with one line on stderr and exit status 2 (bad input, not a bug)."""
    print(f"mamlrun {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _config_path() -> str:
    """The installed configs (`mamlrun.conf`), or the checkout's `conf/` when mamlrun runs from a
    source tree that is not installed (`python -m mamlrun` inside the repository)."""
    from mamlrun.config import SOURCE_CONF_DIR, configs_installed

    return "pkg://mamlrun.conf" if configs_installed() else str(SOURCE_CONF_DIR)


EXAMPLES = textwrap.dedent(
    """\
    examples:
      $ mamlrun train                                   # MAML on sinusoid, the paper's settings
      $ mamlrun train train.iterations=2000 logger=none # a short run, no W&B
      $ mamlrun train -m algorithm=maml,fomaml seed=1,2 # a 4-job sweep under outputs/multirun/
      $ mamlrun train resume=outputs/train/<run>        # continue an interrupted run
      $ mamlrun eval checkpoint=outputs/train/<run>     # 600 test tasks, mean and 95% CI
      $ mamlrun train --cfg job                         # print the composed config and exit
      $ mamlrun data verify dataset=omniglot dataset.root=data/omniglot
      $ mamlrun train dataset=omniglot                  # the paper's 5-way 1-shot Omniglot
    """
)


def _hydra_command(config_name: str, task: Callable) -> Callable[[], None]:
    """A zero-argument entry point running `task(cfg)` under `@hydra.main`.

    A UserError is one readable line and exit status 2. In a `-m` sweep it ends only its own job:
    the job returns NaN (sweepers such as Optuna record a failed trial), the other jobs run, and
    the command exits 2 at the end, naming the jobs that failed.
    """
    failed_jobs: list[str] = []

    def task_function(cfg):
        try:
            return task(cfg)
        except UserError as err:
            from hydra.core.hydra_config import HydraConfig

            job = HydraConfig.get()
            if job.mode.name != "MULTIRUN":
                _fail(config_name, str(err))
            overrides = " ".join(job.overrides.task)
            print(
                f"mamlrun {config_name}: error in job {job.job.num} ({overrides}): {err}",
                file=sys.stderr,
            )
            failed_jobs.append(str(job.job.num))
            return float("nan")

    def entry() -> None:
        import hydra
        from hydra.errors import CompactHydraException

        from mamlrun.config import error_line

        app = hydra.main(config_path=_config_path(), config_name=config_name, version_base="1.3")
        # Hydra reports a bad override (unknown key or option, a value that does not parse) in
        # several lines and exits 1; asked to raise it instead, it becomes our one line, exit 2
        full_error = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            app(task_function)()
        except CompactHydraException as err:
            if full_error == "1":
                raise
            _fail(config_name, error_line(err))
        except ValueError as err:  # Hydra's own flags combined wrongly (`-m --cfg job`)
            if full_error == "1" or not str(err).startswith("Only one of"):
                raise
            _fail(config_name, str(err))
        except OSError as err:  # a path it cannot use (hydra.run.dir, a full disk): no traceback
            if err.filename is None or full_error == "1":
                raise
            _fail(
                config_name,
                f"{err.filename}: {err.strerror} (check the path, its permissions and free "
                "space; finished checkpoints and results are kept)",
            )
        finally:
            if full_error is None:
                os.environ.pop("HYDRA_FULL_ERROR")
            else:
                os.environ["HYDRA_FULL_ERROR"] = full_error
        if failed_jobs:
            _fail(
                config_name,
                f"sweep job(s) {', '.join(failed_jobs)} failed (see their lines above); the "
                "other jobs finished",
            )

    return entry


def _train(cfg):
    from mamlrun.train import run_train

    return run_train(cfg)


def _eval(cfg):
    from mamlrun.evaluate import run_eval

    return run_eval(cfg)


def _plain_command(name: str, module: str, function: str) -> Callable[[list[str]], None]:
    """A subcommand that parses its own arguments: `module.function(args)` imported on use (so
    `mamlrun --help` stays fast), a UserError printed as one line with exit status 2, and a
    non-zero integer it returns used as the exit status."""

    def run(args: list[str]) -> None:
        import importlib

        try:
            status = getattr(importlib.import_module(module), function)(args)
        except UserError as err:
            _fail(name, str(err))
        if isinstance(status, int) and status:
            raise SystemExit(status)

    return run


def _with_argv(name: str, entry: Callable[[], None]) -> Callable[[list[str]], None]:
    """Hydra parses sys.argv itself: hand it the arguments after the subcommand."""

    def run(args: list[str]) -> None:
        if name == "train":
            try:
                args = [_expand_experiment(arg) for arg in args]
            except UserError as err:
                _fail(name, str(err))
            args = args + _resume_overrides(args)
        sys.argv = [f"mamlrun {name}", *args]
        entry()

    return run


# name -> (one-line help, runner taking the arguments after the subcommand)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "train": (
        "meta-train a model, then evaluate it (Hydra app)",
        _with_argv("train", _hydra_command("train", _train)),
    ),
    "eval": (
        "evaluate a checkpoint on test tasks (Hydra app)",
        _with_argv("eval", _hydra_command("eval", _eval)),
    ),
    "data": (
        "prepare or verify a dataset: data {prepare,verify} dataset=omniglot",
        _plain_command("data", "mamlrun.data", "run_data"),
    ),
    "bench": (
        "meta-training throughput vs a plain learn2learn loop (docs/benchmarks.md)",
        _plain_command("bench", "mamlrun.bench", "run_bench"),
    ),
    "reproduce": (
        "rerun a paper table and compare: reproduce {omniglot,miniimagenet,sinusoid,all}",
        _plain_command("reproduce", "mamlrun.reproduce", "run_reproduce"),
    ),
    "report": (
        "tables from finished runs: report <multirun dir | run dirs...> [--out DIR]",
        _plain_command("report", "mamlrun.report", "run_report"),
    ),
}


def usage() -> str:
    lines = ["usage: mamlrun <subcommand> [key=value ...] [hydra flags]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "`mamlrun <subcommand> --help` shows its config groups and Hydra's flags.", ""]
    return "\n".join(lines) + EXAMPLES


def _expand_experiment(arg: str) -> str:
    """`experiment=glob(finn2017/omniglot_*)` as the list of presets it matches, and any other
    `experiment=` value checked against the presets: Hydra sees only the group's top folder,
    where there are none, so its glob would launch 0 jobs and its error list no choices."""
    key, _, value = arg.partition("=")
    if key.lstrip("+") != "experiment" or value in ("", "null"):
        return arg
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    from mamlrun.config import error_line, experiment_presets

    presets = experiment_presets()
    try:
        override = OverridesParser.create().parse_override(arg)
    except HydraException as err:
        raise UserError(error_line(err)) from None
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
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if (
        not resume
        or resume[-1] in ("", "null")
        or any(a.startswith("hydra.run.dir=") for a in args)
    ):
        return []
    target = Path(resume[-1]).expanduser()
    if target.is_file():
        from mamlrun.checkpoints import run_dir_of

        target = run_dir_of(target)
    if not target.is_dir():
        return []  # run_train reports the missing checkpoint with a clear message
    return [f"hydra.run.dir={target.resolve()}", "hydra.output_subdir=null"]


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"mamlrun: warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _one_line_warning  # users see the message, not our source lines
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"mamlrun: error: unknown subcommand {command!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    COMMANDS[command][1](rest)


if __name__ == "__main__":
    main()
