"""Seeds: `mamlrun reproduce <table> seeds=N`, seeds aggregated by `mamlrun report`, the sweep
table sorted by the objective and its plot. Real tiny runs; every expected number is recomputed
here from the runs' own eval.json files. Some 2 minutes on 2 cores."""

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import in_process, refused, run_mamlrun
from mamlrun.analysis.reproduce import RUN, _multiruns, plan
from mamlrun.analysis.runs import FINISHED, Run
from mamlrun.analysis.tables import build_tables

# A reproduce run in seconds: 14 of 70,000 iterations, 20 test tasks at K=5 (the paper's K).
TINY = [
    "budget=0.0002",
    "logger=none",
    "print_config=false",
    "train.val_tasks=10",
    "eval.tasks=20",
    "eval.plot_tasks=0",
    "eval.shots=[5]",
]
CELLS = ("sinusoid_maml", "sinusoid_pretrained")


def _eval(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


def _stamps(table: Path) -> dict[str, int]:
    return {str(p.relative_to(table)): p.stat().st_mtime_ns for p in table.rglob("eval.json")}


def _plan_rows(stdout: str) -> dict[str, str]:
    """The printed plan's action per cell (rich wraps a long cell onto the next lines)."""
    rows: dict[str, str] = {}
    current = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in CELLS:
            current = cells[0]
            rows[current] = cells[1]
        elif cells and not cells[0] and current is not None:
            rows[current] = f"{rows[current]} {cells[1]}".strip()
        else:
            current = None
    return rows


def _check_comparison(table: Path, seeds: list[int]) -> None:
    """comparison.csv holds, per cell and step, each seed's K=5 mean and their mean, std and
    range, as recomputed from the seeds' eval.json files."""
    rows = list(csv.DictReader((table / "comparison.csv").open()))
    assert len(rows) == len(CELLS) * 3
    for row in rows:
        cell = table / "finn2017" / row["preset"].split("/")[1]
        stats = [_eval(cell / f"seed{s}")["results"]["K=5"]["mse"] for s in seeds]
        step = int(row["steps"])
        means = [s["mean"][step] for s in stats]
        assert row["seeds"] == ";".join(map(str, seeds))
        assert [float(v) for v in row["seed_means"].split(";")] == pytest.approx(means, rel=1e-12)
        assert float(row["mamlrun_mean"]) == pytest.approx(statistics.fmean(means), rel=1e-12)
        assert float(row["seed_std"]) == pytest.approx(statistics.stdev(means), rel=1e-9)
        assert float(row["seed_median"]) == pytest.approx(statistics.median(means), rel=1e-12)
        medians = [s["median"][step] for s in stats]
        assert float(row["mamlrun_median"]) == pytest.approx(statistics.median(medians))
        assert int(row["seeds_diverged"]) == sum(s["diverged"][step] > 0 for s in stats)
        inside = min(means) <= float(row["paper_value"]) <= max(means)
        assert row["paper_in_range"] == str(inside)
    assert len({r["seed_means"] for r in rows}) == len(rows), "the seeds must differ"
    markdown = (table / "comparison.md").read_text()
    maml = [_eval(table / "finn2017/sinusoid_maml" / f"seed{s}") for s in seeds]
    each = " / ".join(f"{e['results']['K=5']['mse']['mean'][1]:.3f}" for e in maml)
    assert "| sinusoid_maml | K=5 | 1 | 0.670 | " in markdown and f" | {each} | " in markdown
    assert "paper in seeds' range" in markdown and "## Configurations, seeds aggregated" in markdown


def test_reproduce_seeds_runs_each_seed_once_and_reuses_finished_ones(tmp_path):
    table = tmp_path / "outputs/reproduce/sinusoid"
    # One seed: the one-run layout of before, <cell>/ itself.
    run_mamlrun("reproduce", "sinusoid", *TINY, cwd=tmp_path)
    assert all((table / "finn2017" / c / "eval.json").is_file() for c in CELLS)
    first = {c: (table / "finn2017" / c / "eval.json").stat().st_mtime_ns for c in CELLS}

    # Three seeds: that run becomes seed0/, seeds 1 and 2 train, both cells in one multirun.
    parallel = "hydra/launcher=parallel"  # the seeds' runs two at a time, as users would
    out = run_mamlrun("reproduce", "sinusoid", "seeds=3", parallel, *TINY, cwd=tmp_path).stdout
    assert set(_plan_rows(out).values()) == {"reuse seed 0 (moves to seed0/); run seeds 1, 2"}
    assert out.count("in one Hydra multirun") == 1 and "4 run(s)" in out
    for cell in CELLS:
        seeds = sorted(p.name for p in (table / "finn2017" / cell).iterdir())
        assert seeds == ["seed0", "seed1", "seed2"]
        assert (table / "finn2017" / cell / "seed0/eval.json").stat().st_mtime_ns == first[cell]
        for seed in range(3):
            config = yaml.safe_load(
                (table / f"finn2017/{cell}/seed{seed}/.hydra/config.yaml").open()
            )
            assert config["seed"] == seed
    _check_comparison(table, [0, 1, 2])

    # Again: everything reused, nothing trained (so: in this process, by mamlrun's entry
    # point). Which seeds a larger seeds=N then trains: test_missing_seeds_run_in_as_few_...
    stamps = _stamps(table)
    code, again, _ = in_process("reproduce", "sinusoid", "seeds=3", *TINY, cwd=tmp_path)
    assert code == 0 and set(_plan_rows(again).values()) == {"reuse seeds 0, 1, 2"}
    assert "Hydra multirun" not in again and "reused 6 finished seed run(s)" in again
    assert _stamps(table) == stamps


def test_missing_seeds_run_in_as_few_multiruns_as_cover_them_exactly(tmp_path):
    """Hydra's basic sweeper runs a product: cells missing the same seeds share a multirun, or
    seeds missing in the same cells do, whichever needs fewer; no run is started twice."""
    cells = plan("sinusoid", TINY, seeds=4, root=tmp_path)
    maml, pretrained = cells
    for entry in maml.seeds[:1] + pretrained.seeds[:2]:
        entry.action = "reuse"  # maml misses seeds 1-3, pretrained 2 and 3
    pending = [(c, e) for c in cells for e in c.seeds if e.action == RUN]
    groups = _multiruns(pending)
    started = [(c.name, s) for group, seeds in groups for c in group for s in seeds]
    assert sorted(started) == sorted((c.name, e.seed) for c, e in pending)
    assert len(groups) == 2  # {maml} x {1} and {maml, pretrained} x {2, 3}
    for entry in pretrained.seeds:
        entry.action = RUN
    everything = _multiruns([(c, e) for c in cells for e in c.seeds])
    assert [([c.name for c in g], s) for g, s in everything] == [
        (["sinusoid_maml", "sinusoid_pretrained"], [0, 1, 2, 3])
    ]


@pytest.mark.parametrize("bad", ["seeds=0", "seeds=x", "seeds=1.5"])
def test_a_bad_seeds_argument_is_one_line_naming_it(tmp_path, bad):
    line = refused("reproduce", "sinusoid", bad, "--dry-run", cwd=tmp_path)  # in this process
    assert line.startswith(f"mamlrun reproduce: error: {bad}: must be a whole number")


def test_a_seed_sweep_given_to_reproduce_points_to_seeds(tmp_path):
    result = run_mamlrun("reproduce", "sinusoid", "seed=0,1", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2 and "give seeds=N" in result.stderr


# Two swept keys x 2 seeds, 8 runs in one multirun; tested at the trained K only.
SWEEP = [
    "algorithm.inner_lr=0.02,0.005",
    "algorithm.first_order=true,false",
    "seed=0,1",
    "train.iterations=10",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=10",
    "train.checkpoint_every=10",
    "eval.tasks=20",
    "eval.plot_tasks=0",
    "eval.shots=[10]",
    "logger=none",
    "print_config=false",
]


def _panels(png: Path) -> int:
    """Plot panels in a PNG, counted from the image: each panel's frame has a left and a right
    spine, dark columns running most of the image's height."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    spines = (pixels.max(axis=2) < 80).sum(axis=0) > 0.5 * pixels.shape[0]
    return int((np.diff(np.r_[0, spines.astype(int)]) == 1).sum()) // 2


def _objectives(sweep: Path) -> dict[tuple[str, str], list[float]]:
    """Each configuration's (inner_lr, first_order) test K=10 MSE after the last step, per seed,
    read from the runs' files."""
    found: dict[tuple[str, str], list[float]] = {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir()):
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((run / ".hydra/overrides.yaml").open())
        )
        report = _eval(run)
        value = report["results"]["K=10"]["mse"]["mean"][report["inner_steps"]]
        key = (overrides["algorithm.inner_lr"], overrides["algorithm.first_order"])
        found.setdefault(key, []).append(value)
    return found


def test_report_aggregates_seeds_sorts_by_the_objective_and_plots_each_key(tmp_path):
    sweep = tmp_path / "sweep"
    sweep_args = [*SWEEP, "hydra/launcher=parallel", f"hydra.sweep.dir={sweep}"]
    run_mamlrun("train", "-m", *sweep_args, cwd=tmp_path)
    # the reports: by mamlrun's entry point in this process (they train nothing)
    code, stdout, _ = in_process("report", str(sweep), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert code == 0
    expected = _objectives(sweep)
    assert len(expected) == 4 and all(len(v) == 2 for v in expected.values())

    rows = list(csv.DictReader((tmp_path / "out/sweep.csv").open()))
    assert list(rows[0])[:3] == ["runs", "algorithm.first_order", "algorithm.inner_lr"]
    assert "seed" not in rows[0] and len(rows) == 4
    means = []
    for row in rows:
        values = expected[(row["algorithm.inner_lr"], row["algorithm.first_order"])]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert row["mean over seeds ± std"] == f"{mean:.3f} ± {std:.3f}"
        assert row["each seed"] == " / ".join(f"{v:.3f}" for v in values)
        assert row["seeds"] == "0, 1" and row["objective"] == "test K=10 mse @10"
        means.append(mean)
    assert means == sorted(means), "MSE: best (lowest) first"
    runs = list(csv.DictReader((tmp_path / "out/results.csv").open()))
    objectives = [float(r["objective"]) for r in runs]
    assert objectives == sorted(objectives) and {r["seed"] for r in runs} == {"0", "1"}
    assert "configurations, seeds aggregated" in stdout

    png = tmp_path / "out/sweep_objective.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.info["Software"] == "mamlrun"
    assert _panels(png) == 2

    # Without --out the plot goes into the sweep directory (not into a run directory) ...
    assert in_process("report", str(sweep), cwd=tmp_path)[0] == 0
    assert _panels(sweep / "sweep_objective.png") == 2
    assert not any(sweep.glob("*/sweep_objective.png"))
    # ... and never over a file mamlrun did not write there.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/sweep_objective.png").write_text("my own notes")
    mine = refused("report", str(sweep), "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert "mine/sweep_objective.png" in mine
    assert (tmp_path / "mine/sweep_objective.png").read_text() == "my own notes"
    into_run = refused("report", str(sweep), "--out", str(sweep / "0"), cwd=tmp_path)
    assert "a run directory" in into_run
    assert not (sweep / "0/results.csv").exists()


def _seed_run(seed: int, means: list[float | None], diverged: list[int]) -> Run:
    """A finished sinusoid_maml run with the given K=5 test means after 0, 1, 5 and 10 steps."""
    stats = {
        "mean": means,
        "ci95": [None if m is None else 0.1 for m in means],
        "median": [0.2, 0.15, 0.14, 0.13],
        "diverged": diverged,
    }
    evaluation = {
        "metric": "mse",
        "higher_is_better": False,
        "tasks": 600,
        "inner_steps": 3,
        "dataset": "sinusoid",
        "results": {"K=5": {"shots": 5, "mse": stats}},
    }
    paper = {"table": "Appendix Table 2 (sinusoid, K=5)", "cell": "MAML", "metric": "mse"}
    paper |= {"value": [0.67, 0.38, 0.35], "steps": [1, 2, 3], "ci95": None}
    config = {"seed": seed, "dataset": {"name": "sinusoid", "shots": 10}, "paper": paper}
    overrides = ["experiment=finn2017/sinusoid_maml", f"seed={seed}"]
    return Run(Path(f"/runs/seed{seed}"), FINISHED, config, overrides, 7, 7, evaluation)


def test_seeds_whose_test_tasks_diverged_make_the_mean_inf_and_the_median_says_more():
    """The issue's measurement: after many steps some seeds' means are inf (null in eval.json),
    one is huge; the table says how many seeds diverged and still gives the median over seeds."""
    steps10 = [None, 3.7e12, 0.343, None, None]  # seeds 0-4 after the last step
    runs = [
        _seed_run(seed, [3.1, 0.67 + 0.03 * seed, 0.5, last], [0, 0, 0, int(last is None)])
        for seed, last in enumerate(steps10)
    ]
    tables = build_tables(runs)
    rows = {row[2]: row for row in tables.comparison}
    one, last = rows["1"], rows["3"]
    values = [0.67 + 0.03 * s for s in range(5)]
    assert one[4] == f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
    assert one[7] == "0 of 5" and one[8] == "yes (0.670 to 0.790)"
    assert last[4] == "inf (3 of 5 seeds diverged)"
    assert last[5] == "inf"  # 0.343, 3.7e12, inf, inf, inf: the median is inf as well
    assert last[6] == "inf / 3.700e+12 / 0.343 / inf / inf"
    assert last[7] == "3 of 5 (1, 1, 1 of 600 tasks)" and last[9] == "0.130"
    record = next(r for r in tables.records if r["steps"] == 3)
    assert math.isinf(record["mamlrun_mean"]) and record["paper_in_range"] is True
    assert tables.sweep_rows and not tables.panels  # one configuration: nothing to plot
