"""`mamlrun bench` as users run it: one command, a table of all contenders, one doc section per
machine. Speeds are not asserted here (they are the benchmark's output, not a test)."""

import json
import os
import subprocess

import pytest
import torch

from conftest import MAMLRUN, OMNIGLOT, needs_omniglot, refused, run_mamlrun
from mamlrun.analysis.bench import (
    ABLATION_EAGER,
    ABLATION_VMAP,
    CONTENDERS,
    SETTING_PRESETS,
    bench_setting,
)
from mamlrun.analysis.l2l_script import SCRIPT_LABEL
from mamlrun.analysis.reproduce import _duration
from mamlrun.config.compose import compose_config

ABLATION_BF16 = "mamlrun vmap, bf16 autocast"


def _table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # without header and rule


def test_bench_writes_one_row_per_contender_and_replaces_its_section(tmp_path):
    output = tmp_path / "docs" / "benchmarks.md"
    args = ("bench", "settings=sinusoid", "repeats=2", "seconds=0.1", f"output={output}")
    args += ("ablation=true",)
    run_mamlrun(*args, cwd=tmp_path)
    first = output.read_text()
    rows = _table_rows(first)
    # on a CPU the default compiles batch norm, so the eager kernels are an ablation row too
    assert [row[1] for row in rows] == [*CONTENDERS, ABLATION_VMAP, ABLATION_EAGER, ABLATION_BF16]
    assert all(row[0] == "sinusoid" for row in rows)
    rates = {row[1]: float(row[2]) for row in rows}
    ratios = {row[1]: float(row[5].rstrip("×")) for row in rows}
    assert all(rate > 0 for rate in rates.values())
    assert ratios["learn2learn example"] == 1.0
    for contender, rate in rates.items():  # ratio = median it/s over the example's
        expected = rate / rates["learn2learn example"]
        assert abs(ratios[contender] - expected) <= 0.051 * max(1.0, expected), contender
    assert first.count("\n## ") == 1 and "thread(s)" in first

    run_mamlrun(*args, cwd=tmp_path)  # same machine: its section is replaced, not appended
    assert output.read_text().count("\n## ") == 1


def test_bench_without_compiling_has_no_eager_ablation_row(tmp_path):
    output = tmp_path / "bench.md"
    args = ("bench", "settings=sinusoid", "repeats=1", "seconds=0.1", "compile=false")
    run_mamlrun(*args, "ablation=true", f"output={output}", cwd=tmp_path)
    rows = [row[1] for row in _table_rows(output.read_text())]
    assert rows == [*CONTENDERS, ABLATION_VMAP, ABLATION_BF16]
    assert "compile=false" in output.read_text()  # the command line is recorded


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("settings=omniglot_5w5s", "settings=omniglot_5w5s: unknown"),
        ("cuda_graphs=true", "cuda_graphs=true: for CUDA devices only (add device=cuda)"),
        ("precision=tf32", "precision=tf32: for CUDA devices only (add device=cuda)"),
        ("precision=fp16", "precision=fp16: expected auto, fp32, tf32 or bf16"),
        ("repeats=0", "repeats=0: expected a whole number >= 1"),
        ("seconds=fast", "seconds=fast: expected a number >= 0"),
        ("threads=two", "threads=two: expected a whole number >= 0"),
        ("device=tpu", "device=tpu: expected cpu, cuda or cuda:N"),
        pytest.param(
            "device=cuda",
            "device=cuda: CUDA is not available on this machine (use device=cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        # a root the user names must hold Omniglot: no silent benchmark of random images
        ("omniglot_root=no/such/dir", "omniglot_root=no/such/dir: no/such/dir/images_backgr"),
    ],
)
def test_bench_rejects_bad_options_in_one_line(tmp_path, arg, message):
    """By the console script's entry point in this process (the script itself: the others)."""
    assert message in refused("bench", "settings=omniglot_5w1s", arg, cwd=tmp_path)


def test_bench_help_lists_its_keys_and_defaults(tmp_path):
    out = run_mamlrun("bench", "--help", cwd=tmp_path).stdout
    assert out.startswith("usage: mamlrun bench [key=value ...]")
    for key, default in (("repeats", "5"), ("device", "cpu"), ("output", "docs/benchmarks.md")):
        assert any(line.split() == [key, default] for line in out.splitlines()), key


def test_a_bench_stopped_by_a_time_limit_keeps_every_finished_repeat(tmp_path):
    """Killed during a setting's second repeat, the doc holds the finished settings and the
    repeat it completed, marked as such (a lent GPU's time ran out in this way)."""
    output = tmp_path / "bench.md"
    args = ("bench", "settings=sinusoid,omniglot_5w1s", "repeats=3", "seconds=0.1")
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*MAMLRUN, *args, f"output={output}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for line in process.stdout:  # the doc is written before each repeat's line
            if "omniglot_5w1s: repeat 1/3" in line:
                process.kill()
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    rows = _table_rows(output.read_text())
    settings = {row[0] for row in rows}
    assert settings == {"sinusoid", "omniglot_5w1s (1 of 3 repeats)"}, settings
    assert len(rows) == 2 * len(CONTENDERS)


def _by_contender(text: str) -> dict[str, list[str]]:
    return {row[1]: row for row in _table_rows(text)}


def _assert_gflop_s_is_count_times_rate(rows: dict[str, list[str]]) -> None:
    for contender, row in rows.items():  # GFLOP/s = GFLOP/it x it/s, to the cells' rounding
        rate, gflop, gflop_s = float(row[2]), float(row[7]), float(row[8])
        assert gflop > 0 and gflop_s > 0, contender
        assert gflop_s == pytest.approx(gflop * rate, rel=0.01, abs=0.006 * gflop), contender


def test_bench_settings_are_the_presets_as_composed():
    for name, preset in SETTING_PRESETS.items():
        cfg = compose_config([f"experiment=finn2017/{preset}"])
        setting = bench_setting(name)
        assert setting.meta_batch_size == cfg.algorithm.meta_batch_size, name
        assert setting.inner_steps == cfg.algorithm.inner_steps, name
        assert setting.inner_lr == cfg.algorithm.inner_lr, name
        assert setting.shots == cfg.dataset.shots, name
    twenty = bench_setting("omniglot_20w1s")
    assert (twenty.ways, twenty.inner_steps, twenty.meta_batch_size) == (20, 5, 16)
    assert bench_setting("miniimagenet_5w1s").query_shots == 15


@needs_omniglot
def test_bench_runs_learn2learns_maml_omniglot_script_on_the_real_omniglot(tmp_path):
    output = tmp_path / "bench.md"
    args = ("bench", "settings=omniglot_5w1s", "repeats=1", "seconds=0.1", "throughput=")
    run_mamlrun(*args, f"omniglot_root={OMNIGLOT}", f"output={output}", cwd=tmp_path)
    rows = _by_contender(output.read_text())
    assert list(rows) == [CONTENDERS[0], SCRIPT_LABEL, *CONTENDERS[1:]]
    assert rows[SCRIPT_LABEL][6] == "1.0×"  # the ratio to the script, for the script itself
    rates = {contender: float(row[2]) for contender, row in rows.items()}
    expected = rates["mamlrun vmap"] / rates[SCRIPT_LABEL]
    assert float(rows["mamlrun vmap"][6].rstrip("×")) == pytest.approx(expected, rel=0.06, abs=0.06)
    # a second-order Omniglot 5w1s meta-iteration, as FlopCounterMode counts it
    assert 9 < float(rows["mamlrun learn2learn"][7]) < 12
    _assert_gflop_s_is_count_times_rate(rows)


def test_bench_on_random_images_has_no_script_row(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_DATA", str(tmp_path / "no-omniglot"))
    output = tmp_path / "bench.md"
    args = ("bench", "settings=omniglot_5w1s", "repeats=1", "seconds=0.1", "throughput=")
    result = run_mamlrun(*args, f"output={output}", cwd=tmp_path)
    rows = _by_contender(output.read_text())
    assert list(rows) == list(CONTENDERS)
    assert all(row[6] == "-" for row in rows.values())  # no script to compare with
    assert f"no '{SCRIPT_LABEL}' row" in result.stderr + result.stdout
    _assert_gflop_s_is_count_times_rate(rows)


def test_bench_writes_the_throughput_that_reproduce_estimates_from(tmp_path, monkeypatch):
    file = tmp_path / "throughput.json"
    args = ("bench", "settings=sinusoid", "repeats=1", "seconds=0.1", "output=")
    run_mamlrun(*args, f"throughput={file}", cwd=tmp_path)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    data = json.loads(file.read_text(), parse_constant=refuse)
    entry = data["cpu"]["presets"]["sinusoid_maml"]
    assert entry["tasks_per_second"] > 0 and "mamlrun bench" in entry["command"]
    assert entry["machine"] and entry["date"]
    assert set(data["cpu"]["presets"]) == {"sinusoid_maml"}  # only what it measured

    monkeypatch.setenv("MAMLRUN_THROUGHPUT", str(file))
    out = run_mamlrun("reproduce", "sinusoid", "--dry-run", "budget=0.001", cwd=tmp_path).stdout
    rows = {line.split()[1]: line for line in out.splitlines() if "sinusoid_" in line}
    expected = _duration(70 * 25 / entry["tasks_per_second"])  # 70 iterations x 25 tasks
    assert rows["sinusoid_maml"].split("│")[-2].strip() == expected
    assert rows["sinusoid_pretrained"].split("│")[-2].strip() == "?"  # not in this file
