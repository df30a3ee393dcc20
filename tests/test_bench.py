"""`mamlrun bench` as users run it: one command, a table of all contenders, one doc section per
machine. Speeds are not asserted here (they are the benchmark's output, not a test)."""

from conftest import run_mamlrun
from mamlrun.bench import ABLATION_EAGER, ABLATION_VMAP, CONTENDERS


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
    assert [row[1] for row in rows] == [*CONTENDERS, ABLATION_VMAP, ABLATION_EAGER]
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
    assert [row[1] for row in _table_rows(output.read_text())] == [*CONTENDERS, ABLATION_VMAP]
    assert "compile=false" in output.read_text()  # the command line is recorded


def test_bench_rejects_unknown_settings_in_one_line(tmp_path):
    result = run_mamlrun("bench", "settings=omniglot_5w5s", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2
    assert "settings=omniglot_5w5s: unknown" in result.stderr
    assert "Traceback" not in result.stderr
