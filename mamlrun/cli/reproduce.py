"""`mamlrun reproduce <table> [key=value ...] [--dry-run]`: its arguments; the work is in
`mamlrun.analysis.reproduce`."""

from __future__ import annotations

import argparse

from mamlrun.analysis.reproduce import TABLES, reproduce


def run_reproduce(args: list[str]) -> int:
    """`mamlrun reproduce TABLE [key=value ...] [--dry-run]`."""
    parser = argparse.ArgumentParser(
        prog="mamlrun reproduce",
        description="Run every cell of one of the paper's tables (Hydra multirun) and compare "
        "with the paper. Overrides apply to every cell, e.g. budget=0.01 for a scaled run.",
    )
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument("overrides", nargs="*", help="key=value for every cell (budget=0.01 ...)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and cost only")
    if not {"-h", "--help"} & set(args) and all(arg.startswith("-") for arg in args):
        # no table: argparse would also ask for the optional overrides
        parser.error(f"name a table: {', '.join([*TABLES, 'all'])}")
    options = parser.parse_intermixed_args(args)
    tables = list(TABLES) if options.table == "all" else [options.table]
    status = 0
    for table in tables:
        status = max(status, reproduce(table, options.overrides, options.dry_run))
    return status
