"""`mamlrun report <multirun dir | run dirs...> [--out DIR]`: tables rebuilt from finished runs."""

from __future__ import annotations

from pathlib import Path

from mamlrun import console
from mamlrun.analysis.runs import find_runs, load_run
from mamlrun.analysis.tables import (
    Tables,
    build_tables,
    print_tables,
    write_sweep_plot,
    write_tables,
)
from mamlrun.cli.parser import ArgumentParser
from mamlrun.errors import UserError
from mamlrun.run.rundir import is_run_dir


def _plot_only(tables: Tables, paths: list[Path]) -> list[Path]:
    """Without --out, the sweep plot still goes into the one sweep directory given (never into a
    run directory): the tables are printed, the plot has nowhere else to be seen."""
    if not tables.panels:
        return []
    if len(paths) != 1 or is_run_dir(paths[0]):
        console.info("the sweep plot is written with --out DIR (or for one sweep directory)")
        return []
    try:
        plot = write_sweep_plot(tables, paths[0])
    except OSError as err:
        raise UserError(
            f"{paths[0]}: cannot write the sweep plot there ({err.strerror}); give --out DIR"
        ) from None
    console.info(f"wrote {plot}")
    return [plot] if plot else []


def _report_study(study_dir: Path, out: Path | None) -> list[Path]:
    """A `mamlrun tune` study directory: its trials, best trial and plots from its storage."""
    from mamlrun.analysis import tune_report

    record = tune_report.read_record(study_dir)
    study = tune_report.load_recorded_study(record)
    target = out or study_dir
    target.mkdir(parents=True, exist_ok=True)
    return tune_report.write_results(study, target, record)


def run_report(args: list[str]) -> list[Path]:
    """`mamlrun report PATH... [--out DIR]`: print the tables; with --out, also write them."""
    parser = ArgumentParser(
        prog="mamlrun report",
        description="Tables from finished runs: paper vs mamlrun for presets, results for sweeps "
        "(sorted by the objective, seeds aggregated), and a plot of the objective against each "
        "swept key.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun directory or run dirs")
    parser.add_argument(
        "--out", type=Path, help="also write the tables (Markdown, CSV) and the plots here"
    )
    options = parser.parse_args(args)
    if len(options.paths) == 1 and (options.paths[0] / "tune.json").is_file():
        return _report_study(options.paths[0], options.out)
    if options.out is not None and is_run_dir(options.out):
        raise UserError(f"--out {options.out}: a run directory; name a directory of its own")
    runs = [load_run(p) for p in find_runs(options.paths)]
    if not runs:
        raise UserError(
            f"no run directories (.hydra/, eval.json) in {' '.join(map(str, options.paths))}"
        )
    base = options.paths[0].resolve() if len(options.paths) == 1 else Path.cwd()
    tables = build_tables(runs, base)
    print_tables(tables, "mamlrun report")
    if options.out is None:
        return _plot_only(tables, options.paths)
    try:
        written = write_tables(tables, runs, options.out, "mamlrun report")
    except OSError as err:  # the tables are printed above: nothing is lost
        raise UserError(
            f"--out {options.out}: cannot write there ({err.strerror}); name a writable directory"
        ) from None
    console.info(f"wrote {', '.join(str(p) for p in written)}")
    return written
