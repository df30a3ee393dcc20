"""`mamlrun report <multirun dir | run dirs...> [--out DIR]`: tables rebuilt from finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from mamlrun import console
from mamlrun.analysis.runs import find_runs, load_run
from mamlrun.analysis.tables import build_tables, print_tables, write_tables
from mamlrun.errors import UserError


def run_report(args: list[str]) -> list[Path]:
    """`mamlrun report PATH... [--out DIR]`: print the tables; with --out, also write them."""
    parser = argparse.ArgumentParser(
        prog="mamlrun report",
        description="Tables from finished runs: paper vs mamlrun for presets, results for sweeps.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun directory or run dirs")
    parser.add_argument("--out", type=Path, help="also write the tables (Markdown, CSV) here")
    options = parser.parse_args(args)
    runs = [load_run(p) for p in find_runs(options.paths)]
    if not runs:
        raise UserError(
            f"no run directories (.hydra/, eval.json) in {' '.join(map(str, options.paths))}"
        )
    base = options.paths[0].resolve() if len(options.paths) == 1 else Path.cwd()
    tables = build_tables(runs, base)
    print_tables(tables, "mamlrun report")
    if options.out is None:
        return []
    try:
        written = write_tables(tables, runs, options.out, "mamlrun report")
    except OSError as err:  # the tables are printed above: nothing is lost
        raise UserError(
            f"--out {options.out}: cannot write there ({err.strerror}); name a writable directory"
        ) from None
    console.info(f"wrote {', '.join(str(p) for p in written)}")
    return written
