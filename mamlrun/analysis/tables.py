"""Tables from runs: the results table of any sweep, and paper vs mamlrun for paper presets.

- the results table: one row per run, the swept keys as columns, the final validation metric,
  the test metric with its 95% CI per setting, the run's wall time and status;
- the comparison table, for runs of a paper preset (a `paper:` block in the config): the paper's
  value ± CI next to mamlrun's, the difference, and whether the 95% intervals overlap.

Runs that did not finish are listed with their status, never dropped: a table that hides a failed
cell looks more complete than it is. `mamlrun report` and `mamlrun reproduce` both write these.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mamlrun import console
from mamlrun.analysis.runs import FINISHED, Run
from mamlrun.config.compose import parse_overrides
from mamlrun.run.evaluation import mean_cell, number_text

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


# ------------------------------------------------------------------------------------- format


def _scale(metric: str) -> tuple[float, int, str]:
    """Accuracy in percent with 2 decimals, as the paper's tables; MSE as is with 3."""
    return (100.0, 2, " %") if metric == "acc" else (1.0, 3, "")


def format_value(metric: str, mean: float | None, ci: float | None = None) -> str:
    """`mean ± ci` as the test table writes numbers (scientific from 1e6 on); a None mean (null in
    eval.json: tasks diverged) is `inf`."""
    scale, digits, unit = _scale(metric)
    if mean is None:
        return "inf" + unit
    text = number_text(scale * mean, digits)
    if ci is not None:
        text += f" ± {number_text(scale * ci, digits)}"
    return text + unit


def _inf_for_null(value: float | None) -> float:
    """eval.json's null mean or median: tasks diverged, which count as +inf (as in the median)."""
    return math.inf if value is None else value


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
    (named as `mamlrun.run.build.setting_label` names them: `K=5`, `5-way 1-shot`)."""
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
                        mamlrun_mean=_inf_for_null(stats["mean"][step]),
                        mamlrun_ci95=stats["ci95"][step],
                        mamlrun_median=_inf_for_null(stats["median"][step]),
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
            difference = number_text(scale * r["difference"], digits)
            difference = ("" if difference.startswith("-") else "+") + difference + unit
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


def _override_values(run: Run) -> dict[str, str]:
    """The run's overrides as {key: value as written}."""
    return {o.key: o.value_text for o in parse_overrides(run.overrides) if o.value_text is not None}


def _swept_keys(per_run: list[dict[str, str]]) -> list[str]:
    """Override keys whose values differ between runs (the sweep); a single run's keys all."""
    keys = sorted({k for overrides in per_run for k in overrides})
    if len(per_run) == 1:
        return keys
    return [k for k in keys if len({o.get(k) for o in per_run}) > 1]


def results_table(runs: list[Run], base: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Any runs: swept keys, final validation metric, test metric ± 95% CI per setting, status."""
    overrides = [_override_values(r) for r in runs]
    swept = _swept_keys(overrides)
    names = [
        str(r.path.relative_to(base)) if base and r.path.is_relative_to(base) else str(r.path)
        for r in runs
    ]
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
            scale, digits, unit = _scale(metric)
            row.append(f"{mean_cell(result[metric], last, scale, digits, unit)} @{last}")
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
    import torch

    from mamlrun.run.runtime import cpu_model

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


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
    from mamlrun.run.plots import adaptation_comparison  # matplotlib: only to draw

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
    return adaptation_comparison(curves, references, "mse", title, out / "sinusoid_k5_steps.png")
