"""Every JSON file mamlrun writes is strict JSON: a non-finite value is null, never `NaN` or
`Infinity`, and the tables read the nulls back as the cells they showed for the floats."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from conftest import run_mamlrun
from mamlrun.analysis.tables import format_value
from mamlrun.run import jsonio
from mamlrun.run.evaluation import headline, mean_cell, number_text, summarize, table_rows
from mamlrun.run.tracking import MetricsFile, read_metrics


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as JSON.parse does."""
    return json.loads(text, parse_constant=_refuse)


def node_parses(text: str) -> None:
    """JSON.parse accepts `text` (checked only where node is installed)."""
    if shutil.which("node") is None:
        return
    script = 'JSON.parse(require("fs").readFileSync(0, "utf8"))'
    result = subprocess.run(["node", "-e", script], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_strict_loads_refuses_what_python_json_writes_for_non_finite_floats():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps([math.nan]))
    assert strict_loads(jsonio.dumps({"a": [math.nan, -math.inf, (math.inf, 1.5)]})) == {
        "a": [None, None, [None, 1.5]]
    }


def test_summarize_of_diverged_tasks_round_trips_with_null_exactly_where_non_finite():
    inf, nan = math.inf, math.nan
    values = torch.tensor(
        [[1.0, 0.5, inf, 3e17], [2.0, inf, nan, 1.0], [3.0, nan, inf, 2.0], [4.0, 0.75, 1.0, 1.0]]
    )
    stats = summarize(values)
    assert stats["diverged"] == [0, 2, 3, 0]
    assert stats["median"][1:3] == [0.75, inf]  # diverged count as +inf; 3 of 4: the median too
    loaded = strict_loads(jsonio.dumps(stats))
    for key in ("mean", "std", "ci95", "median"):
        assert [v is None for v in loaded[key]] == [not math.isfinite(v) for v in stats[key]], key
        assert [v for v in loaded[key] if v is not None] == [
            v for v in stats[key] if math.isfinite(v)
        ]
    assert loaded["diverged"] == stats["diverged"]

    # the tables show the same cells from the floats in memory and from eval.json's nulls
    assert [mean_cell(loaded, s, 1, 3) for s in range(4)] == [
        mean_cell(stats, s, 1, 3) for s in range(4)
    ]
    assert mean_cell(stats, 1, 1, 3) == "inf (2 diverged, median 0.750)"  # was `nan ± nan (...`
    assert mean_cell(loaded, 2, 1, 3) == "inf (3 diverged, median inf)"
    assert mean_cell(loaded, 3, 1, 3) == "7.500e+16 ± 1.273e+17"  # was 17 digits ± 18
    report = {"metric": "mse", "inner_steps": 3, "results": {"K=5": {"mse": stats}}}
    assert table_rows({**report, "results": {"K=5": {"mse": loaded}}}) == table_rows(report)

    # what training hands to Hydra's sweepers stays floats (nan included)
    flat = headline(report)
    assert all(isinstance(v, float) for v in flat.values())
    assert math.isnan(flat["test/K5/mse_step1"]) and flat["test/K5/mse_step0"] == 2.5


def test_numbers_from_1e6_on_are_scientific_in_every_table():
    assert number_text(3.390847464589165e17, 3) == "3.391e+17"
    assert number_text(-2e6, 3) == "-2.000e+06"
    assert number_text(999999.0, 3) == "999999.000"
    assert number_text(0.25, 2) == "0.25"
    assert number_text(None, 3) == "inf"
    assert format_value("mse", 3.390847464589165e17, 5.340991450199769e17) == (
        "3.391e+17 ± 5.341e+17"
    )
    assert format_value("acc", 0.9772, 0.006) == "97.72 ± 0.60 %"  # as before
    assert format_value("mse", None) == "inf"


def test_metrics_rows_write_non_finite_losses_as_null_and_read_them_back_as_nan(tmp_path):
    metrics = MetricsFile(tmp_path)
    row = metrics.write(5, "train", {"loss_pre": math.inf, "loss_post": math.nan, "x": 0.5})
    assert math.isnan(row["loss_post"]) and row["loss_pre"] == math.inf  # in memory: floats
    metrics.write(10, "val", {"mse_step0": 1.0, "mse_step1": -math.inf})
    lines = metrics.path.read_text().splitlines()
    assert [strict_loads(line) for line in lines] == [
        {"iteration": 5, "split": "train", "loss_pre": None, "loss_post": None, "x": 0.5},
        {"iteration": 10, "split": "val", "mse_step0": 1.0, "mse_step1": None},
    ]
    rows = read_metrics(metrics.path)
    assert math.isnan(rows[0]["loss_post"]) and math.isnan(rows[1]["mse_step1"])
    MetricsFile(tmp_path, keep_until=5)  # resuming rewrites the kept rows: strict too
    assert [strict_loads(line)["iteration"] for line in metrics.path.read_text().splitlines()] == [
        5
    ]


# A run whose test tasks diverge after a few steps (inner_lr 50 times the paper's), with the
# paper preset's reference so that the report also writes the comparison. Some 25 s on 2 cores.
DIVERGING = [
    "experiment=finn2017/sinusoid_maml",
    "algorithm.inner_lr=0.5",
    "train.iterations=300",
    "train.val_tasks=20",
    "eval.tasks=100",
    "eval.plot_tasks=0",
    "hardware.compile=false",
    "logger=none",
    "print_config=false",
]


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("diverged")
    run_dir = cwd / "run"
    result = run_mamlrun("train", *DIVERGING, f"hydra.run.dir={run_dir}", cwd=cwd)
    return run_dir, result.stdout


def _test_table(stdout: str) -> dict[str, list[str]]:
    """The printed test table's cells per setting (after 0, 1, 5, 10 steps)."""
    rows = {}
    for line in stdout[stdout.index("Test: ") :].splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].startswith("K="):
            rows[cells[0]] = cells[1:]
    return rows


def test_a_diverged_run_writes_strict_json_with_nulls_where_tasks_diverged(diverged_run):
    run_dir, _ = diverged_run
    text = (run_dir / "eval.json").read_text()
    node_parses(text)
    report = strict_loads(text)
    nulls = 0
    for result in report["results"].values():
        for stats in (result["mse"], result["loss"]):
            diverged = stats["diverged"]
            for key in ("mean", "std", "ci95"):  # non-finite exactly where a task diverged
                assert [v is None for v in stats[key]] == [d > 0 for d in diverged], key
            half = report["tasks"] / 2
            assert [v is None for v in stats["median"]] == [d > half for d in diverged]
            nulls += sum(v is None for v in stats["mean"])
    assert nulls > 0, "the run was meant to diverge"

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [strict_loads(line) for line in lines]
    for line in lines:
        node_parses(line)
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["mse_step0"] is not None and val["mse_step10"] is None


def test_the_tables_of_a_diverged_run_agree_and_print_huge_means_in_scientific(
    diverged_run, tmp_path
):
    run_dir, stdout = diverged_run
    table = _test_table(stdout)
    assert set(table) == {"K=5", "K=10", "K=20"}
    cells = [c for row in table.values() for c in row]
    assert not any(re.search(r"\d{8}", c) for c in cells), "a many-digit number"
    assert any(re.fullmatch(r"\d\.\d{3}e\+\d\d ± \d\.\d{3}e\+\d\d", c) for c in cells), cells
    assert any(re.fullmatch(r"inf \(\d+ diverged, median \d+\.\d{3}\)", c) for c in cells), cells
    assert not any("nan" in c for c in cells)

    out = tmp_path / "report"
    run_mamlrun("report", str(run_dir), "--out", str(out), cwd=tmp_path)
    results = list(csv.DictReader((out / "results.csv").open()))
    for label, row in table.items():  # the report reads eval.json's nulls: the same cells
        assert results[0][f"test {label} mse"] == f"{row[-1]} @10"
    comparison = list(csv.DictReader((out / "comparison.csv").open()))
    markdown = (out / "comparison.md").read_text()
    for record in comparison:
        step = [0, 1, 5, 10].index(int(record["steps"]))
        cell = table[record["setting"]][step]
        if int(record["diverged"]):
            assert record["mamlrun_mean"] == "inf"  # divergence counts as +inf, as the median
            expected = cell[:-1].replace(", median ", ") | ")  # `inf (3 diverged) | 5.770`
        else:
            expected = cell  # the median has a column of its own
        row = f"| sinusoid_maml | {record['setting']} | {record['steps']} | "
        assert any(
            line.startswith(row) and f" | {expected} | " in line for line in markdown.splitlines()
        ), (row, expected)
