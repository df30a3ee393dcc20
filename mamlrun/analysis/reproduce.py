"""`mamlrun reproduce <table> [key=value ...] [--dry-run]`: rerun a table of the paper, compare.

Every cell of the table is a preset (`conf/experiment/finn2017/*.yaml`, with the paper's number in
its `paper:` block). The cells that still need running go through one Hydra multirun
(`mamlrun train -m experiment=finn2017/a,finn2017/b ...`), so a configured launcher
(`hydra/launcher=...`) runs them, into a stable directory per cell:
`outputs/reproduce/<table>/finn2017/<cell>/`. With `seeds=N` every cell runs with the seeds
`seed`, ..., `seed + N - 1`, each in its own run directory `<cell>/seed<k>/` (one seed's mean is
one draw of a heavy-tailed statistic: which few test tasks diverge depends on the trained model).
A cell keeps that layout once it has it; a one-seed run already in `<cell>/` becomes
`<cell>/seed<its seed>/` rather than being trained again.
Running the command again picks up where it stopped, per seed:

- a run with `eval.json`, the same overrides and the same seed is reused, not rerun;
- a run with a checkpoint but no `eval.json` (interrupted) is resumed with `resume=`;
- anything else runs from scratch; a previous run with other overrides is moved to
  `<table>/.replaced/<time>/`, never deleted.

Then the comparison table (paper ± CI, mamlrun ± CI, difference, overlap of the 95% intervals;
with several seeds the mean over seeds ± their std, each seed's value, how many seeds diverged and
whether the paper lies in the seeds' range) is printed and written as Markdown and CSV next to the
cells, by `mamlrun.analysis.tables`, stating the budget and the hardware so that a scaled run is
never mistaken for the paper's protocol.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
from mamlrun.run.rundir import is_run_dir

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
class SeedRun:
    """One seed of a cell, the run directory it has, and what this invocation does with it."""

    seed: int
    path: Path
    action: str = RUN
    done: int = 0  # iterations already trained (a resumed run)
    note: str = ""


@dataclass
class Cell:
    """One preset of a table, where its seeds run, and what this invocation will do with them."""

    name: str
    path: Path
    settings: RunConfig
    configured_iterations: int
    config: dict[str, Any]
    seeds: list[SeedRun] = field(default_factory=list)
    seeded: bool = False  # each seed in <cell>/seed<k>/; else <cell>/ is the cell's one run
    flat_seed: int | None = None  # seeded, with a one-seed run in <cell>/ to move to seed<k>/

    @property
    def experiment(self) -> str:
        return f"{PRESETS}/{self.name}"

    @property
    def flat_run(self) -> bool:
        """A one-seed run in <cell>/ that the seeds' layout must move out of the way."""
        return self.seeded and is_run_dir(self.path)


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
            hint = "give seeds=N" if override.key == "seed" else "sweep with mamlrun train -m"
            raise UserError(f"{override.text}: reproduce runs each cell once per seed; {hint}")
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


SEED_DIR = re.compile(r"seed\d+")


def _has_seed_dirs(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and SEED_DIR.fullmatch(p.name) for p in path.iterdir())


def _config_seed(path: Path) -> int | None:
    """The seed a run directory's run trained with (its `.hydra/config.yaml`)."""
    file = rundir.hydra_file(path, rundir.CONFIG)
    if not file.is_file():
        return None
    seed = (yaml.safe_load(file.read_text()) or {}).get("seed")
    return seed if isinstance(seed, int) else None


def _plan_seed(seed: int, path: Path, source: Path, expected: dict[str, Any]) -> SeedRun:
    """Whether the run of `seed` now in `source` (its `path`, or a one-seed cell's directory) is
    reused, resumed or run: its overrides but `seed` must be `expected`, and its seed `seed`."""
    entry = SeedRun(seed, path)
    recorded = _recorded_overrides(source)
    if recorded is not None:
        recorded.pop("seed", None)
    same = recorded == expected and _config_seed(source) == seed
    run = load_run(source) if same else None
    if run is not None and run.status == FINISHED:
        entry.action, entry.done = REUSE, run.iteration or 0
    elif run is not None and run.iteration is not None:
        entry.action, entry.done = RESUME, run.iteration
        entry.note = f"from {run.iteration:,}"
    elif source.exists():
        entry.note = "no checkpoint" if same else "other overrides: old run set aside"
    if source != path:
        entry.note = ", ".join(filter(None, [entry.note, f"moves to {path.name}/"]))
    return entry


def plan(table: str, overrides: list[str], seeds: int = 1, root: Path = ROOT) -> list[Cell]:
    """The table's cells with their settings, and whether each seed is reused, resumed or run.

    Seeds are the cells' `seed` (0, or a `seed=` override) and the `seeds - 1` after it.
    """
    wanted = _parse_overrides(overrides)
    wanted.pop("seed", None)  # compared through each run's own config
    cells = []
    for name in TABLES[table]:
        cell = Cell(name, root / table / PRESETS / name, *_compose(name, overrides))
        cell.seeded = seeds > 1 or _has_seed_dirs(cell.path)
        if cell.flat_run:
            cell.flat_seed = _config_seed(cell.path)
        expected = {"experiment": cell.experiment, **wanted}
        first = cell.settings.seed
        for seed in range(first, first + seeds):
            path = cell.path / f"seed{seed}" if cell.seeded else cell.path
            source = cell.path if cell.flat_run and seed == cell.flat_seed else path
            cell.seeds.append(_plan_seed(seed, path, source, expected))
        cells.append(cell)
    return cells


def _action_text(cell: Cell) -> str:
    """`reuse`, or with several seeds `reuse seeds 0, 1; run seed 2`, with each one's note."""
    if len(cell.seeds) == 1 and not cell.seeded:
        entry = cell.seeds[0]
        return entry.action + (f" ({entry.note})" if entry.note else "")
    parts = []
    for action in (REUSE, RESUME, RUN):
        chosen = [e for e in cell.seeds if e.action == action]
        if chosen:
            listed = ", ".join(str(e.seed) + (f" ({e.note})" if e.note else "") for e in chosen)
            parts.append(f"{action} seed{'s' * (len(chosen) > 1)} {listed}")
    if cell.flat_run and cell.flat_seed not in [e.seed for e in cell.seeds]:
        kept = cell.flat_seed  # not one of these seeds: kept for a later, wider seeds=
        parts.append("one-seed run set aside" if kept is None else f"seed {kept} to seed{kept}/")
    return "; ".join(parts)


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
        remaining = sum(iterations - e.done for e in cell.seeds if e.action != REUSE)
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
                _action_text(cell),
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


def _move_aside(path: Path, table_dir: Path, stamp: str) -> None:
    """Keep a previous run that cannot be reused out of the table's way, under
    `<table>/.replaced/<stamp>/` at the same place (`<cell>` or `<cell>/seed<k>`)."""
    if not path.exists():
        return
    target = table_dir / ".replaced" / stamp / path.relative_to(table_dir / PRESETS)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    console.info(f"{path.relative_to(table_dir)}: previous run moved to {target}")


def _to_seed_layout(cell: Cell, table_dir: Path, stamp: str) -> None:
    """A one-seed run in `<cell>/` becomes `<cell>/seed<its seed>/` (set aside if its seed is
    unknown), so that the cell's directory holds only its seeds' run directories."""
    if not cell.flat_run:
        return
    if cell.flat_seed is None:
        _move_aside(cell.path, table_dir, stamp)
        return
    moving = cell.path.with_name(f".{cell.name}.to-seed{cell.flat_seed}")
    cell.path.rename(moving)
    cell.path.mkdir()
    moving.rename(cell.path / f"seed{cell.flat_seed}")
    console.info(f"{cell.name}: its one-seed run is now {cell.path / f'seed{cell.flat_seed}'}")


def _refuse_held(cells: list[Cell]) -> None:
    """A reproduce started again while the first still trains one of its runs: refused before
    anything is moved."""
    for cell in cells:
        paths = [e.path for e in cell.seeds if e.action != REUSE]
        for path in paths + ([cell.path] if cell.flat_run else []):
            if (pid := rundir.holder(path)) is not None:
                raise UserError(
                    f"{path.resolve()}: a mamlrun train (pid {pid}) is training this cell; "
                    "wait for it to finish or stop it, then run reproduce again"
                )


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


Pending = list[tuple[Cell, SeedRun]]


def _multiruns(pending: Pending) -> list[tuple[list[Cell], list[int] | None]]:
    """The runs to start as few Hydra multiruns as cover them exactly: Hydra's basic sweeper
    runs the product `experiment=a,b seed=0,1,2`, so either cells that miss the same seeds share
    one (a fresh table: a single multirun) or seeds that the same cells miss do, whichever needs
    fewer. Cells in the one-seed layout run without a `seed=` sweep (seeds None), as always."""
    seeded = [(c.name, e.seed) for c, e in pending if c.seeded]
    by_cell: dict[tuple[int, ...], list[str]] = {}
    for name in dict.fromkeys(n for n, _ in seeded):
        by_cell.setdefault(tuple(s for n, s in seeded if n == name), []).append(name)
    by_seed: dict[tuple[str, ...], list[int]] = {}
    for seed in sorted({s for _, s in seeded}):
        by_seed.setdefault(tuple(n for n, s in seeded if s == seed), []).append(seed)
    cells = {c.name: c for c, _ in pending}
    pairs = by_seed.items() if len(by_seed) < len(by_cell) else ((n, s) for s, n in by_cell.items())
    groups = [([cells[n] for n in names], list(seeds)) for names, seeds in pairs]
    flat: list[Cell] = [c for c, _ in pending if not c.seeded]
    return ([(flat, None)] if flat else []) + groups


def _multirun(table_dir: Path, cells: list[Cell], seeds: list[int] | None, overrides: list[str]):
    """One `mamlrun train -m` child for `cells` (x `seeds`), into each run's stable directory."""
    experiments = ",".join(c.experiment for c in cells)
    given = _sweep_overrides(overrides)
    subdir = "${hydra.runtime.choices.experiment}"
    if seeds is not None:  # this command's seed= is the first seed, and each job gets its own
        given = [o for o, p in zip(given, parse_overrides(given), strict=True) if p.key != "seed"]
        given.append(f"seed={','.join(map(str, seeds))}")
        subdir += "/seed${seed}"
    jobs = len(cells) * (len(seeds) if seeds else 1)
    what = f"{experiments}" + (f" x seeds {','.join(map(str, seeds))}" if seeds else "")
    console.info(f"running {jobs} run(s) in one Hydra multirun: {what}")
    _mamlrun(
        [
            "train",
            "-m",
            f"experiment={experiments}",
            *given,
            f"hydra.sweep.dir={table_dir.resolve()}",
            f"hydra.sweep.subdir={subdir}",
        ]
    )


def run_cells(table_dir: Path, cells: list[Cell], overrides: list[str]) -> None:
    """Multiruns for the runs to start, then `resume=` for each interrupted one."""
    _refuse_held(cells)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for cell in cells:
        _to_seed_layout(cell, table_dir, stamp)
    pending = [(c, e) for c in cells for e in c.seeds if e.action == RUN]
    for _, entry in pending:
        _move_aside(entry.path, table_dir, stamp)
    while pending:
        for group, seeds in _multiruns(pending):
            _multirun(table_dir, group, seeds, overrides)
        # A job that exits (mamlrun's usage errors do, with status 2) ends Hydra's sweep: start
        # the runs it never reached. Each round starts at least one run, or nothing could start.
        left = [(c, e) for c, e in pending if not e.path.exists()]
        pending = left if len(left) < len(pending) else []
    for cell in cells:
        for entry in cell.seeds:
            name = cell.name + (f" seed {entry.seed}" if cell.seeded else "")
            if entry.action == RESUME:
                console.info(f"{name}: resuming from iteration {entry.done:,}")
                _mamlrun(["train", f"resume={entry.path.resolve()}"])
            elif entry.action == REUSE:
                console.info(f"{name}: reused (finished, same overrides): {entry.path}")


def _result(cell: Cell, entry: SeedRun, overrides: list[str]) -> Run:
    """A seed's run; one that never started still carries its config and the overrides it would
    have recorded, so the comparison lists its paper reference with status `not run` instead of
    leaving it out."""
    run = load_run(entry.path)
    if run.status == NOT_RUN:
        typed = [o for o in parse_overrides(overrides) if not o.is_hydra]
        if cell.seeded:  # each seed's job records its own seed=
            typed = [o for o in typed if o.key != "seed"] + parse_overrides([f"seed={entry.seed}"])
        run.config = {**cell.config, "seed": entry.seed}
        run.overrides = [f"experiment={cell.experiment}", *(o.text for o in typed)]
        run.iterations = cell.settings.train.iterations
    return run


def reproduce(
    table: str, overrides: list[str], dry_run: bool, seeds: int = 1, root: Path = ROOT
) -> int:
    """Plan, run and compare one table with `seeds` seeds per cell; returns the exit status (1 if
    a run did not finish)."""
    cells = plan(table, overrides, seeds, root)
    throughput = _throughput(cells)
    columns, rows, tasks, seconds, unmeasured = plan_table(cells, throughput)
    first = cells[0].settings.seed
    each = f" x {seeds} seeds ({first}–{first + seeds - 1})" if seeds > 1 else ""
    console.print_table(
        f"reproduce {table}: {len(cells)} cells{each} → {root / table}", columns, rows
    )
    where = throughput.where
    if unmeasured:
        where += f"; not counting the {unmeasured} cell(s) marked ?, unmeasured there"
    console.info(f"cost: {tasks:,} training tasks, about {_duration(seconds)} {where})")
    if dry_run:
        return 0
    table_dir = root / table
    run_cells(table_dir, cells, overrides)
    groups = [[_result(cell, entry, overrides) for entry in cell.seeds] for cell in cells]
    runs = [run for group in groups for run in group]
    title = f"mamlrun reproduce {table}"
    tables = build_tables(runs, base=table_dir.resolve(), groups=groups)
    print_tables(tables, title)
    written = write_tables(tables, runs, table_dir, title)
    console.info(f"wrote {', '.join(str(p) for p in written)}")
    reused = sum(e.action == REUSE for cell in cells for e in cell.seeds)
    if reused:
        what = "seed run(s)" if seeds > 1 else "cell(s)"
        console.info(f"reused {reused} finished {what} without rerunning them")
    return 0 if all(r.status == FINISHED for r in runs) else 1
