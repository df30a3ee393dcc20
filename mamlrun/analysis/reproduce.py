"""`mamlrun reproduce <table> [key=value ...] [--dry-run]`: rerun a table of the paper, compare.

Every cell of the table is a preset (`conf/experiment/finn2017/*.yaml`, with the paper's number in
its `paper:` block). The cells that still need running go through one Hydra multirun
(`mamlrun train -m experiment=finn2017/a,finn2017/b ...`), so a configured launcher
(`hydra/launcher=...`) runs them, into a stable directory per cell:
`outputs/reproduce/<table>/finn2017/<cell>/`.
Running the command again picks up where it stopped:

- a cell with `eval.json` and the same overrides is reused, not rerun;
- a cell with a checkpoint but no `eval.json` (interrupted) is resumed with `resume=`;
- anything else runs from scratch; a previous run of the cell with other overrides is moved to
  `<table>/.replaced/<time>/`, never deleted.

Then the comparison table (paper ± CI, mamlrun ± CI, difference, overlap of the 95% intervals) is
printed and written as Markdown and CSV next to the cells, by `mamlrun.analysis.tables`, stating
the budget and the hardware so that a scaled run is never mistaken for the paper's protocol.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamlrun import console
from mamlrun.analysis.runs import FINISHED, NOT_RUN, Run, load_run
from mamlrun.analysis.tables import build_tables, print_tables, write_tables
from mamlrun.analysis.throughput import device_throughput, throughput_file
from mamlrun.config.compose import compose_config, parse_overrides, to_container
from mamlrun.config.schema import RunConfig, SinusoidDataset
from mamlrun.config.validate import validate
from mamlrun.errors import UserError
from mamlrun.run import rundir

PRESETS = "finn2017"
TABLES: dict[str, list[str]] = {
    "omniglot": [
        "omniglot_5w1s",
        "omniglot_5w5s",
        "omniglot_20w1s",
        "omniglot_20w5s",
        "omniglot_mlp_5w1s",
        "omniglot_mlp_5w5s",
    ],
    "miniimagenet": [
        "miniimagenet_5w1s",
        "miniimagenet_5w5s",
        "miniimagenet_fo_5w1s",
        "miniimagenet_fo_5w5s",
    ],
    "sinusoid": ["sinusoid_maml", "sinusoid_pretrained"],
}
ROOT = Path("outputs/reproduce")

REUSE, RESUME, RUN = "reuse", "resume", "run"


@dataclass
class Cell:
    """One preset of a table, where it runs, and what this invocation will do with it."""

    name: str
    path: Path
    settings: RunConfig
    configured_iterations: int
    config: dict[str, Any]
    action: str = RUN
    done: int = 0  # iterations already trained (a resumed cell)
    note: str = ""

    @property
    def experiment(self) -> str:
        return f"{PRESETS}/{self.name}"


def _parse_overrides(overrides: list[str], given: bool = True) -> dict[str, Any]:
    """Task overrides as {key: value}: the form in which two runs' overrides are compared
    (`print_config=false` and Hydra's recorded `print_config=False` are the same).

    Args:
        overrides: key=value strings, as typed or as recorded in `.hydra/overrides.yaml`.
        given: they come from this command line: refuse what reproduce cannot honor.

    Raises:
        UserError: for a sweep (a cell runs once) or a key reproduce sets itself.
    """
    result = {}
    for override in parse_overrides(overrides):
        if given and override.is_sweep:
            raise UserError(
                f"{override.text}: reproduce runs each cell once; sweep with mamlrun train -m"
            )
        reserved = override.key == "experiment" or override.key.startswith(
            ("hydra.sweep", "hydra.run")
        )
        if given and reserved:
            raise UserError(f"{override.text}: reproduce sets {override.key} itself; drop it")
        if not override.is_hydra:  # Hydra's own settings are not part of a run's config
            result[override.key] = override.value  # `++a.b=1` sets what `a.b=1` sets
    return result


def _compose(name: str, overrides: list[str]) -> tuple[RunConfig, int, dict[str, Any]]:
    """The cell's typed config (iterations after `budget`), its configured iterations, and the
    config as plain data (what its run will record)."""
    task_overrides = [o.text for o in parse_overrides(overrides) if not o.is_hydra]
    try:
        cfg = compose_config([f"experiment={PRESETS}/{name}", *task_overrides])
    except UserError as err:
        raise UserError(f"{name}: {err}") from None
    return validate(cfg), int(cfg.train.iterations), to_container(cfg)


def _recorded_overrides(path: Path) -> dict[str, Any] | None:
    file = rundir.hydra_file(path, rundir.OVERRIDES)
    if not file.is_file():
        return None
    return _parse_overrides(yaml.safe_load(file.read_text()) or [], given=False)


def plan(table: str, overrides: list[str], root: Path = ROOT) -> list[Cell]:
    """The table's cells with their settings, and whether each is reused, resumed or run."""
    wanted = _parse_overrides(overrides)
    cells = []
    for name in TABLES[table]:
        cell = Cell(name, root / table / PRESETS / name, *_compose(name, overrides))
        recorded = _recorded_overrides(cell.path)
        same = recorded == {"experiment": cell.experiment, **wanted}
        run = load_run(cell.path) if same else None
        if run is not None and run.status == FINISHED:
            cell.action, cell.done = REUSE, run.iteration or 0
        elif run is not None and run.iteration is not None:
            cell.action, cell.done = RESUME, run.iteration
            cell.note = f"from {run.iteration:,}"
        elif cell.path.exists():
            cell.note = "no checkpoint" if same else "other overrides: old run set aside"
        cells.append(cell)
    return cells


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 1 else "< 1 s"


@dataclass
class Throughput:
    """Measured tasks per second on one kind of machine, for the plan's time estimates."""

    machine: str  # the column's name: "est. <machine> time"
    where: str  # what the total's estimate is for and where the numbers come from
    tasks_per_second: dict[str, float]


def _throughput(cells: list[Cell]) -> Throughput:
    """The machine the estimates are for (the cells' device type), with the tasks/s that
    `mamlrun bench` and earlier sessions measured there (`mamlrun/analysis/throughput.json`); none
    (every estimate "?") where that file is missing or unreadable."""
    cuda = any(cell.settings.hardware.device.startswith("cuda") for cell in cells)
    label, rates = device_throughput("cuda" if cuda else "cpu")
    source = f"measured tasks/s from {throughput_file()}"
    if cuda:
        label = label or "GPU"
        return Throughput(label, f"on an {label} GPU (training only; {source}", rates)
    return Throughput(
        label or "CPU",
        f"on a CPU (training only; {source}; a GPU is much faster for the conv presets",
        rates,
    )


def plan_table(
    cells: list[Cell], throughput: Throughput
) -> tuple[list[str], list[list[str]], int, float, int]:
    """Per cell: the paper's settings as composed, iterations after budget, estimated cost.

    Returns:
        columns, rows, the tasks left to train, the estimated seconds on `throughput`'s machine
        of the cells with a throughput constant for it, and how many cells to train have none.
    """
    columns = [
        "cell",
        "action",
        "ways",
        "K",
        "alpha",
        "steps train/test",
        "meta-batch",
        "iterations",
        "tasks to train",
        f"est. {throughput.machine} time",
    ]
    rows, total_tasks, seconds, unmeasured = [], 0, 0.0, 0
    for cell in cells:
        dataset, algorithm = cell.settings.dataset, cell.settings.algorithm
        iterations = cell.settings.train.iterations
        budget = cell.settings.budget
        if isinstance(dataset, SinusoidDataset):
            ways, shots = "–", f"{dataset.shots} (test {'/'.join(map(str, dataset.eval_shots))})"
        else:
            ways, shots = str(dataset.ways), str(dataset.shots)
        remaining = 0 if cell.action == REUSE else iterations - cell.done
        tasks = remaining * algorithm.meta_batch_size
        rate = throughput.tasks_per_second.get(cell.name)
        total_tasks += tasks
        if rate:
            seconds += tasks / rate
        elif tasks:
            unmeasured += 1
        iterations_text = f"{iterations:,}"
        if budget != 1:
            iterations_text += f" (budget {budget:g} of {cell.configured_iterations:,})"
        rows.append(
            [
                cell.name,
                cell.action + (f" ({cell.note})" if cell.note else ""),
                ways,
                shots,
                f"{algorithm.inner_lr:g}",
                f"{algorithm.inner_steps}/{algorithm.test_inner_steps}",
                str(algorithm.meta_batch_size),
                iterations_text,
                f"{tasks:,}",
                _duration(tasks / rate) if rate else "?",
            ]
        )
    return columns, rows, total_tasks, seconds, unmeasured


def _move_aside(cell: Cell, stamp: str) -> None:
    """Keep a previous run of the cell that cannot be reused, out of the table's way."""
    if not cell.path.exists():
        return
    target = cell.path.parents[1] / ".replaced" / stamp / cell.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(cell.path), str(target))
    console.info(f"{cell.name}: previous run moved to {target}")


def _mamlrun(args: list[str]) -> int:
    """Run `mamlrun ARGS` as a child process (Hydra owns its process), output to this terminal."""
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "mamlrun", *args], check=False).returncode


def _sweep_overrides(overrides: list[str]) -> list[str]:
    """The overrides as the multirun needs them.

    Hydra first composes a multirun's config without its sweep (`experiment=a,b`), so a key that
    only a preset brings (`dataset.root` of an Omniglot preset) would fail there; `++` lets it
    through. Nothing unchecked gets in: `plan` has composed every cell with the overrides as typed.
    """
    return [
        f"++{o.text}"
        if o.value_text is not None and "." in o.key and o.text[0] not in "+~"
        else o.text
        for o in parse_overrides(overrides)
    ]


def run_cells(table_dir: Path, cells: list[Cell], overrides: list[str]) -> None:
    """One multirun for the cells to run, then `resume=` for each interrupted cell."""
    for cell in cells:  # a reproduce started again while the first still trains a cell
        if cell.action != REUSE and (pid := rundir.holder(cell.path)) is not None:
            raise UserError(
                f"{cell.path.resolve()}: a mamlrun train (pid {pid}) is training this cell; "
                "wait for it to finish or stop it, then run reproduce again"
            )
    to_run = [c for c in cells if c.action == RUN]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for cell in to_run:
        _move_aside(cell, stamp)
    while to_run:
        experiments = ",".join(c.experiment for c in to_run)
        console.info(f"running {len(to_run)} cell(s) in one Hydra multirun: {experiments}")
        _mamlrun(
            [
                "train",
                "-m",
                f"experiment={experiments}",
                *_sweep_overrides(overrides),
                f"hydra.sweep.dir={table_dir.resolve()}",
                "hydra.sweep.subdir=${hydra.runtime.choices.experiment}",
            ]
        )
        # A job that exits (mamlrun's usage errors do, with status 2) ends Hydra's sweep: start
        # the cells it never reached. Each round starts at least one cell, or nothing could start.
        left = [c for c in to_run if not c.path.exists()]
        to_run = left if len(left) < len(to_run) else []
    for cell in cells:
        if cell.action == RESUME:
            console.info(f"{cell.name}: resuming from iteration {cell.done:,}")
            _mamlrun(["train", f"resume={cell.path.resolve()}"])
        elif cell.action == REUSE:
            console.info(f"{cell.name}: reused (finished, same overrides): {cell.path}")


def _result(cell: Cell) -> Run:
    """The cell's run; one that never started still carries its config, so the comparison lists
    its paper reference with status `not run` instead of leaving it out."""
    run = load_run(cell.path)
    if run.status == NOT_RUN:
        run.config, run.overrides = cell.config, [f"experiment={cell.experiment}"]
        run.iterations = cell.settings.train.iterations
    return run


def reproduce(table: str, overrides: list[str], dry_run: bool, root: Path = ROOT) -> int:
    """Plan, run and compare one table; returns the exit status (1 if a cell did not finish)."""
    cells = plan(table, overrides, root)
    throughput = _throughput(cells)
    columns, rows, tasks, seconds, unmeasured = plan_table(cells, throughput)
    console.print_table(f"reproduce {table}: {len(cells)} cells → {root / table}", columns, rows)
    where = throughput.where
    if unmeasured:
        where += f"; not counting the {unmeasured} cell(s) marked ?, unmeasured there"
    console.info(f"cost: {tasks:,} training tasks, about {_duration(seconds)} {where})")
    if dry_run:
        return 0
    table_dir = root / table
    run_cells(table_dir, cells, overrides)
    runs = [_result(cell) for cell in cells]
    title = f"mamlrun reproduce {table}"
    tables = build_tables(runs, base=table_dir.resolve())
    print_tables(tables, title)
    written = write_tables(tables, runs, table_dir, title)
    console.info(f"wrote {', '.join(str(p) for p in written)}")
    reused = sum(c.action == REUSE for c in cells)
    if reused:
        console.info(f"reused {reused} finished cell(s) without rerunning them")
    return 0 if all(r.status == FINISHED for r in runs) else 1
