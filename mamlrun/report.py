"""`mamlrun report <multirun dir | run dirs...> [--out DIR]`: tables rebuilt from finished runs.

A run directory is read, never re-run: its config (`checkpoints/last.pt`, which reflects a resumed
run's changes, else `.hydra/config.yaml`), its overrides (`.hydra/overrides.yaml`), `metrics.jsonl`
and `eval.json`. Two tables come out of it:

- the results table, for any sweep: one row per run, the swept keys as columns, the final
  validation metric, the test metric with its 95% CI per setting, the run's wall time and status;
- the comparison table, for runs of a paper preset (a `paper:` block in the config): the paper's
  value ± CI next to mamlrun's, the difference, and whether the 95% intervals overlap.

Runs that did not finish are listed with their status (failed / unfinished / not evaluated), never
dropped: a table that hides a failed cell looks more complete than it is. `mamlrun reproduce`
writes its tables with the same functions.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamlrun import console
from mamlrun.errors import UserError

# A run's status, from the files it left.
FINISHED = "finished"
NOT_EVALUATED = "not evaluated"  # trained to the end, no eval.json (e.g. train.eval_at_end=false)
UNFINISHED = "unfinished"  # a checkpoint before the last iteration: `mamlrun train resume=<dir>`
FAILED = "failed"  # neither a checkpoint nor eval.json: the job raised (or has just started)
NOT_RUN = "not run"  # the directory does not exist

COMPARISON_COLUMNS = [
    "preset",
    "setting",
    "steps",
    "paper",
    "mamlrun",
    "mamlrun median",
    "difference",
    "95% CIs overlap",
    "iterations",
    "status",
]


@dataclass
class Run:
    """What one run directory holds."""

    path: Path
    status: str
    config: dict[str, Any]
    overrides: list[str]
    iteration: int | None = None  # of the last checkpoint
    iterations: int | None = None  # planned, after `budget`
    evaluation: dict[str, Any] | None = None  # eval.json
    val: dict[str, Any] | None = None  # the last validation row of metrics.jsonl
    seconds: float | None = None

    @property
    def preset(self) -> str:
        """The experiment preset (`finn2017/omniglot_5w1s`), else the directory name."""
        for override in self.overrides:
            if override.startswith("experiment="):
                return override.split("=", 1)[1]
        return self.path.name

    @property
    def metric(self) -> str:
        if self.evaluation:
            return self.evaluation["metric"]
        return "mse" if self.config.get("dataset", {}).get("name") == "sinusoid" else "acc"


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".hydra", "eval.json", "checkpoints"))


def _natural(name: str) -> tuple[bool, int, str]:
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths`, or below them (a multirun sweep); hidden folders skipped."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such directory")
        if is_run_dir(path):
            found.append(path)
            continue
        for root, dirs, _ in os.walk(path):
            # Hydra's job folders 0, 1, ..., 10 in numeric order; hidden ones (.replaced) skipped.
            dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural)
            if is_run_dir(Path(root)) and Path(root) != path:
                found.append(Path(root))
                dirs[:] = []  # a run's own subfolders (checkpoints, wandb) hold no runs
    return found


def _planned_iterations(config: dict[str, Any]) -> int | None:
    """`train.iterations` after `budget`, computed by the same validation a run uses."""
    from omegaconf import OmegaConf

    from mamlrun.config import validate

    try:
        return validate(OmegaConf.create(config))["train"].iterations
    except Exception:  # noqa: BLE001 - another mamlrun version's config, or a refused one
        planned = (config.get("train") or {}).get("iterations")
        return planned if isinstance(planned, int) else None


def _last_val(path: Path) -> dict[str, Any] | None:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    return val[-1] if val else None


def _wall_seconds(path: Path) -> float | None:
    """From the run's first file (.hydra/config.yaml) to its last write: includes any pause
    between an interruption and `resume=`, so it is approximate."""
    start = path / ".hydra" / "config.yaml"
    ends = [path / n for n in ("eval.json", "metrics.jsonl", "checkpoints/last.pt")]
    ends = [p.stat().st_mtime for p in ends if p.exists()]
    if not start.exists() or not ends:
        return None
    return max(0.0, max(ends) - start.stat().st_mtime)


def load_run(path: Path) -> Run:
    """Read a run directory; a missing one is a run with status `not run`."""
    path = path.resolve()
    if not path.is_dir():
        return Run(path, NOT_RUN, {}, [])
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = (
        (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []
    )
    config: dict[str, Any] = {}
    iteration = None
    last = path / "checkpoints" / "last.pt"
    if last.is_file():
        from mamlrun import checkpoints

        try:
            payload = checkpoints.load(last)
            config, iteration = payload["config"], payload["iteration"]
        except UserError:
            pass  # a truncated checkpoint: the run is treated as if it had none
    if not config and (path / ".hydra" / "config.yaml").exists():
        config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text()) or {}
    evaluation = None
    if (path / "eval.json").is_file():
        evaluation = json.loads((path / "eval.json").read_text())
    iterations = _planned_iterations(config) if config else None
    if evaluation is not None:
        status = FINISHED
    elif iteration is None:
        status = FAILED
    elif iterations is not None and iteration < iterations:
        status = UNFINISHED
    else:
        status = NOT_EVALUATED
    return Run(
        path,
        status,
        config,
        list(overrides),
        iteration,
        iterations,
        evaluation,
        _last_val(path),
        _wall_seconds(path),
    )


# ------------------------------------------------------------------------------------- format


def _scale(metric: str) -> tuple[float, int, str]:
    """Accuracy in percent with 2 decimals, as the paper's tables; MSE as is with 3."""
    return (100.0, 2, " %") if metric == "acc" else (1.0, 3, "")


def format_value(metric: str, mean: float, ci: float | None = None) -> str:
    scale, digits, unit = _scale(metric)
    text = f"{scale * mean:.{digits}f}"
    if ci is not None:
        text += f" ± {scale * ci:.{digits}f}"
    return text + unit


def _as_list(value: Any, length: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * length


def _iterations_text(run: Run) -> str:
    done = run.iteration if run.iteration is not None else 0
    if run.iterations is None:
        return "?"
    budget = run.config.get("budget", 1.0)
    text = f"{done:,}/{run.iterations:,}"
    return text + (f" (budget {budget:g})" if isinstance(budget, float) and budget != 1.0 else "")


def settings_of(run: Run) -> list[str]:
    """The run's test settings: eval.json's, or for a run without one, those it would have had
    (named as `builders.setting_label` names them: `K=5`, `5-way 1-shot`)."""
    if run.evaluation:
        return list(run.evaluation["results"])
    dataset = run.config.get("dataset") or {}
    if dataset.get("name") == "sinusoid":
        return [f"K={k}" for k in dataset.get("eval_shots", [])]
    return [f"{dataset.get('ways')}-way {dataset.get('shots')}-shot"]


def paper_setting(run: Run) -> str | None:
    """The setting the paper's number refers to: the one its reference names ("K=5" in
    "Appendix Table 2 (sinusoid, K=5)", "5-way 1-shot" in "MAML, conv, 5-way 1-shot"), else the
    run's only setting."""
    paper = run.config.get("paper") or {}
    text = f"{paper.get('table', '')} {paper.get('cell', '')}"
    labels = settings_of(run)
    named = [label for label in labels if label in text]
    return named[0] if named else labels[0] if len(labels) == 1 else None


def comparison_records(runs: list[Run]) -> list[dict[str, Any]]:
    """One record per preset, setting and step the paper reports: paper vs mamlrun, raw numbers.

    Settings the paper has no number for (sinusoid K=10, 20) get records without a paper value;
    runs without a result get records with their status, so no cell goes missing.
    """
    records = []
    for run in runs:
        paper = run.config.get("paper")
        if not paper:
            continue
        steps = _as_list(paper.get("steps"), 1)
        values = _as_list(paper.get("value"), len(steps))
        cis = _as_list(paper.get("ci95"), len(steps))
        reference = paper_setting(run)
        results = (run.evaluation or {}).get("results", {})
        for setting in settings_of(run):
            for step, value, ci in zip(steps, values, cis, strict=True):
                record = {
                    "preset": run.preset,
                    "table": paper.get("table"),
                    "cell": paper.get("cell"),
                    "metric": paper.get("metric", run.metric),
                    "setting": setting,
                    "steps": step,
                    "paper_value": value if setting == reference else None,
                    "paper_ci95": ci if setting == reference else None,
                    "status": run.status,
                    "iterations": _iterations_text(run),
                    "budget": run.config.get("budget", 1.0),
                    "tasks": (run.evaluation or {}).get("tasks"),
                }
                stats = (results.get(setting) or {}).get(record["metric"])
                if stats is not None and step < len(stats["mean"]):
                    record.update(
                        mamlrun_mean=stats["mean"][step],
                        mamlrun_ci95=stats["ci95"][step],
                        mamlrun_median=stats["median"][step],
                        diverged=stats.get("diverged", [0] * (step + 1))[step],
                    )
                records.append(_compare(record))
    return records


def _compare(record: dict[str, Any]) -> dict[str, Any]:
    """Difference (mamlrun - paper) and whether the two 95% intervals overlap.

    Without a paper CI (sinusoid) the paper's interval is its value alone: "overlap" then means
    the paper's value lies inside mamlrun's interval.
    """
    mean, value = record.get("mamlrun_mean"), record.get("paper_value")
    record["difference"] = record["overlap"] = None
    if mean is None or value is None:
        return record
    paper_ci = record["paper_ci95"] or 0.0
    record["difference"] = mean - value
    if math.isfinite(mean):
        record["overlap"] = abs(mean - value) <= record["mamlrun_ci95"] + paper_ci
    else:
        record["overlap"] = False
    return record


def comparison_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """COMPARISON_COLUMNS as text: percent for accuracy, ± 95% CI, `*` where the paper has no CI."""
    rows = []
    for r in records:
        metric = r["metric"]
        paper = "–"
        if r["paper_value"] is not None:
            paper = format_value(metric, r["paper_value"], r["paper_ci95"])
        mamlrun = median = difference = overlap = "–"
        if r.get("mamlrun_mean") is not None:
            mamlrun = format_value(metric, r["mamlrun_mean"], r["mamlrun_ci95"])
            if r.get("diverged"):
                mamlrun += f" ({r['diverged']} diverged)"
            median = format_value(metric, r["mamlrun_median"])
        if r["difference"] is not None:
            scale, digits, unit = _scale(metric)
            difference = f"{scale * r['difference']:+.{digits}f}{unit}"
            overlap = ("yes" if r["overlap"] else "no") + ("*" if r["paper_ci95"] is None else "")
        status = r["status"] if r["status"] != FINISHED else "ok"
        rows.append(
            [
                r["preset"].rsplit("/", 1)[-1],  # finn2017/omniglot_5w1s: the CSV has it all
                r["setting"],
                str(r["steps"]),
                paper,
                mamlrun,
                median,
                difference,
                overlap,
                r["iterations"],
                status,
            ]
        )
    return rows


def _swept_keys(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose values differ between runs (the sweep), and those common to all."""
    per_run = [dict(o.lstrip("+~").split("=", 1) for o in r.overrides if "=" in o) for r in runs]
    keys = sorted({k for overrides in per_run for k in overrides})
    swept = [k for k in keys if len({o.get(k) for o in per_run}) > 1]
    common = {k: per_run[0][k] for k in keys if k not in swept and k in per_run[0]}
    if len(runs) == 1:
        return keys, {}
    return swept, common


def results_table(runs: list[Run], base: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Any runs: swept keys, final validation metric, test metric ± 95% CI per setting, status."""
    swept, _ = _swept_keys(runs)
    names = [
        str(r.path.relative_to(base)) if base and r.path.is_relative_to(base) else str(r.path)
        for r in runs
    ]
    overrides = [dict(o.lstrip("+~").split("=", 1) for o in r.overrides if "=" in o) for r in runs]
    # A key that only repeats the run's name (reproduce's `experiment`) adds nothing.
    swept = [k for k in swept if [o.get(k) for o in overrides] != names]
    settings: list[tuple[str, str]] = []  # (setting label, metric) across runs, in first-seen order
    for run in runs:
        for label in (run.evaluation or {}).get("results", {}):
            if (label, run.metric) not in settings:
                settings.append((label, run.metric))
    columns = ["run", *swept, "status", "iterations", "val (last)"]
    columns += [f"test {label} {metric}" for label, metric in settings]
    columns.append("wall")
    rows = []
    for run, name, values in zip(runs, names, overrides, strict=True):
        row = [name, *(values.get(k, "–") for k in swept), run.status]
        row.append(_iterations_text(run))
        row.append(_val_text(run))
        for label, metric in settings:
            result = (run.evaluation or {}).get("results", {}).get(label)
            if result is None or run.metric != metric:
                row.append("–")
                continue
            last = run.evaluation["inner_steps"]
            stats = result[metric]
            cell = format_value(metric, stats["mean"][last], stats["ci95"][last])
            row.append(f"{cell} @{last}")
        row.append("–" if run.seconds is None else f"{run.seconds:.0f} s")
        rows.append(row)
    return columns, rows


def _val_text(run: Run) -> str:
    """The last validation row's metric after the most adaptation steps it holds."""
    if not run.val:
        return "–"
    prefix = f"{run.metric}_step"
    steps = [int(k[len(prefix) :]) for k in run.val if k.startswith(prefix)]
    if not steps:
        return "–"
    return f"{format_value(run.metric, run.val[f'{prefix}{max(steps)}'])} @{max(steps)}"


# --------------------------------------------------------------------------------- write out


def machine() -> str:
    """This machine's accelerator or CPU model, and torch's version."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def hardware_text(runs: list[Run]) -> str:
    """What the runs asked for, and the machine the table was made on (reproduce runs there)."""
    asked = sorted(
        {
            f"{r.config['hardware'].get('device')} "
            f"({r.config['hardware'].get('threads') or 'all'} threads)"
            for r in runs
            if r.config.get("hardware")
        }
    )
    return f"hardware: runs used {', '.join(asked) or '?'}; this machine: {machine()}"


def _budgets(runs: list[Run]) -> list[float]:
    """The runs' `budget` values (a refused run's config may hold anything: skipped)."""
    values = (r.config.get("budget", 1.0) for r in runs if r.config)
    return sorted({float(b) for b in values if isinstance(b, int | float)})


def header_lines(runs: list[Run]) -> list[str]:
    """Budget, evaluation size and hardware: what a reader needs before trusting any number."""
    budgets = _budgets(runs)
    lines = []
    if any(b != 1.0 for b in budgets):
        lines.append(
            f"budget {', '.join(f'{b:g}' for b in budgets)}: a SCALED run with a fraction of the "
            "paper's training iterations; its numbers are not the paper protocol's"
        )
    else:
        lines.append("budget 1 (train.iterations as each run set it, not scaled)")
    tasks = sorted({r.evaluation["tasks"] for r in runs if r.evaluation})
    if tasks:
        lines.append(f"test tasks per setting: {', '.join(map(str, tasks))} (paper: 600)")
    lines.append(hardware_text(runs))
    done = sum(r.status == FINISHED for r in runs)
    lines.append(f"runs: {done} of {len(runs)} finished")
    return lines


def _markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Tables:
    """Both tables of a set of runs, as text rows, and the raw comparison records (for CSV)."""

    header: list[str]
    records: list[dict[str, Any]]
    comparison: list[list[str]]
    columns: list[str]
    rows: list[list[str]]


def build_tables(runs: list[Run], base: Path | None = None) -> Tables:
    """The comparison (runs with a paper reference) and the results table (every run)."""
    records = comparison_records(runs)
    columns, rows = results_table(runs, base)
    return Tables(header_lines(runs), records, comparison_rows(records), columns, rows)


def print_tables(tables: Tables, title: str) -> None:
    if tables.comparison:
        console.print_table(
            f"{title}: paper vs mamlrun (mean ± 95% CI)", COMPARISON_COLUMNS, tables.comparison
        )
    console.print_table(f"{title}: runs", tables.columns, tables.rows)
    for line in tables.header:
        console.info(line)


def write_tables(tables: Tables, runs: list[Run], out: Path, title: str) -> list[Path]:
    """Write the tables to `out`; returns the files written.

    comparison.md / comparison.csv when some run has a paper reference (the Markdown also holds
    the runs table), else results.md; results.csv always; for sinusoid presets a
    Figure-3-style plot, sinusoid_k5_steps.png.
    """
    out.mkdir(parents=True, exist_ok=True)
    markdown = [f"# {title}", "", *(f"- {line}" for line in tables.header), ""]
    written = []
    if tables.records:
        references = {
            r.preset: f"{r.config['paper']['table']}: {r.config['paper']['cell']}"
            for r in runs
            if r.config.get("paper")
        }
        markdown += [
            "## Paper vs mamlrun",
            "",
            _markdown_table(COMPARISON_COLUMNS, tables.comparison),
        ]
        markdown += [
            "Mean ± 95% CI over test tasks; difference = mamlrun − paper. `*`: the paper "
            "gives no CI; overlap then means the paper's value lies in mamlrun's interval.",
            "",
            *(f"- {k}: {v}" for k, v in references.items()),
            "",
        ]
        with (out / "comparison.csv").open("w", newline="") as f:
            fields = list(dict.fromkeys(k for r in tables.records for k in r))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(tables.records)
        written.append(out / "comparison.csv")
        plot = _sinusoid_plot(runs, out)
        if plot is not None:
            markdown += [f"![test MSE vs gradient steps, K=5]({plot.name})", ""]
            written.append(plot)
    markdown += ["## Runs", "", _markdown_table(tables.columns, tables.rows)]
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([tables.columns, *tables.rows])
    written.append(out / "results.csv")
    path = out / ("comparison.md" if tables.records else "results.md")
    path.write_text("\n".join(markdown))
    return [path, *written]


def _sinusoid_plot(runs: list[Run], out: Path) -> Path | None:
    """Figure 3 of the paper: K=5 test MSE against gradient steps, each sinusoid preset."""
    from mamlrun import plots

    curves, references = {}, {}
    for run in runs:
        result = (run.evaluation or {}).get("results", {}).get("K=5")
        if run.evaluation is None or run.evaluation["dataset"] != "sinusoid" or result is None:
            continue
        curves[run.preset] = result["mse"]
        paper = run.config.get("paper") or {}
        if paper_setting(run) == "K=5" and paper.get("value") is not None:
            references[run.preset] = (_as_list(paper["steps"], 1), _as_list(paper["value"], 1))
    if not curves:
        return None
    budgets = _budgets([r for r in runs if r.preset in curves])
    title = "sinusoid, K=5 (paper Figure 3)"
    if budgets != [1.0]:
        title += f", budget {', '.join(f'{b:g}' for b in budgets)}"
    return plots.adaptation_comparison(
        curves, references, "mse", title, out / "sinusoid_k5_steps.png"
    )


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
