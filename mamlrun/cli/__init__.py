"""The `mamlrun` console script: `mamlrun <subcommand> [hydra overrides and flags]`.

Dispatch only, no ML logic. Hydra subcommands (`train`, `eval`) go through `@hydra.main`, so every
Hydra flag keeps working after the subcommand (`-m`, `--cfg job`, `--help`, `--info`, sweeps,
launchers). New subcommands are one entry in `COMMANDS`.
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Callable

from mamlrun.cli.hydra_app import eval_command, train_command
from mamlrun.errors import UserError, fail

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
      $ mamlrun tune search=sinusoid tune.workers=2     # Optuna study, outputs/tune/sinusoid/
      $ mamlrun train dataset=folder dataset.root=my_images  # meta-train on your own classes
      $ mamlrun adapt checkpoint=outputs/train/<run> support=new/ query=photos/
    """
)


def _plain_command(name: str, module: str, function: str) -> Callable[[list[str]], None]:
    """A subcommand that parses its own arguments: `module.function(args)` imported on use (so
    `mamlrun --help` stays fast), a UserError printed as one line with exit status 2, and a
    non-zero integer it returns used as the exit status."""

    def run(args: list[str]) -> None:
        import importlib

        try:
            status = getattr(importlib.import_module(module), function)(args)
        except UserError as err:
            fail(name, str(err))
        if isinstance(status, int) and status:
            raise SystemExit(status)

    return run


COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "train": (
        "meta-train a model, then evaluate it (Hydra app)",
        train_command,
    ),
    "eval": (
        "evaluate a checkpoint on test tasks (Hydra app)",
        eval_command,
    ),
    "adapt": (
        "adapt a trained model to your few-shot task: adapt checkpoint=<run> support=<dir>",
        _plain_command("adapt", "mamlrun.cli.adapt", "run_adapt"),
    ),
    "data": (
        "prepare or verify a dataset: data {prepare,verify} dataset=omniglot",
        _plain_command("data", "mamlrun.cli.data", "run_data"),
    ),
    "bench": (
        "meta-training throughput vs a plain learn2learn loop (docs/benchmarks.md)",
        _plain_command("bench", "mamlrun.cli.bench", "run_bench"),
    ),
    "reproduce": (
        "rerun a paper table and compare: reproduce {omniglot,miniimagenet,sinusoid,all} [seeds=N]",
        _plain_command("reproduce", "mamlrun.cli.reproduce", "run_reproduce"),
    ),
    "tune": (
        "hyperparameter search with Optuna: tune search=<name> [tune.trials=N tune.workers=K]",
        _plain_command("tune", "mamlrun.cli.tune", "run_tune"),
    ),
    "report": (
        "tables from finished runs: report <multirun dir | run dirs... | tune study> [--out DIR]",
        _plain_command("report", "mamlrun.cli.report", "run_report"),
    ),
    "checkpoint": (
        "convert a TRUSTED older checkpoint to data only: checkpoint convert <old.pt> [--out]",
        _plain_command("checkpoint", "mamlrun.cli.checkpoint", "run_checkpoint"),
    ),
}


def usage() -> str:
    lines = ["usage: mamlrun <subcommand> [key=value ...] [hydra flags]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "`mamlrun <subcommand> --help` shows its config groups and Hydra's flags.", ""]
    return "\n".join(lines) + EXAMPLES


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
    try:
        COMMANDS[command][1](rest)
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops training cleanly)
        print(f"mamlrun {command}: aborted (KeyboardInterrupt)", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
