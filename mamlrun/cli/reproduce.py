"""`mamlrun reproduce <table> [seeds=N] [key=value ...] [--dry-run]`: its arguments; the work is in
`mamlrun.analysis.reproduce`."""

from __future__ import annotations

from mamlrun.analysis.reproduce import TABLES, reproduce
from mamlrun.cli.parser import ArgumentParser
from mamlrun.errors import UserError


def _seeds(overrides: list[str]) -> tuple[int, list[str]]:
    """`seeds=N` (how many seeds each cell runs with: a reproduce argument, not a run config
    key) taken out of the overrides; 1 where not given.

    Raises:
        UserError: N is not a whole number >= 1, or seeds= is given twice.
    """
    given = [o for o in overrides if o.startswith("seeds=")]
    rest = [o for o in overrides if not o.startswith("seeds=")]
    if not given:
        return 1, rest
    if len(given) > 1:
        raise UserError(f"seeds: given {len(given)} times ({', '.join(given)}); give it once")
    text = given[0].removeprefix("seeds=")
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            f"seeds={text}: must be a whole number >= 1, the seeds per cell (seeds=5 runs the "
            "seeds seed to seed+4)"
        )
    return int(text), rest


def run_reproduce(args: list[str]) -> int:
    """`mamlrun reproduce TABLE [seeds=N] [key=value ...] [--dry-run]`."""
    parser = ArgumentParser(
        prog="mamlrun reproduce",
        description="Run every cell of one of the paper's tables (Hydra multirun) and compare "
        "with the paper. Overrides apply to every cell, e.g. budget=0.01 for a scaled run; "
        "seeds=N runs each cell with the seeds seed, ..., seed+N-1 and compares their mean, "
        "spread and range with the paper.",
    )
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument(
        "overrides", nargs="*", help="seeds=N, and key=value for every cell (budget=0.01 ...)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and cost only")
    if not {"-h", "--help"} & set(args) and all(arg.startswith("-") for arg in args):
        # no table: argparse would also ask for the optional overrides
        parser.error(f"name a table: {', '.join([*TABLES, 'all'])}")
    options = parser.parse_intermixed_args(args)
    seeds, overrides = _seeds(options.overrides)
    tables = list(TABLES) if options.table == "all" else [options.table]
    status = 0
    for table in tables:
        status = max(status, reproduce(table, overrides, options.dry_run, seeds))
    return status
