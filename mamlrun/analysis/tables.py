"""Tables from runs: the results table of any sweep, paper vs mamlrun for paper presets, and the
sweep table with seeds aggregated.

- the results table: one row per run, the swept keys as columns, the final validation metric,
  the objective (`mamlrun.analysis.sweep`), the test metric with its 95% CI per setting, the
  run's wall time and status; best objective first;
- the comparison table, for runs of a paper preset (a `paper:` block in the config): the paper's
  value ± CI next to mamlrun's, the difference, and whether the 95% intervals overlap; where a
  preset ran with several seeds, the mean over seeds ± their std, the median over seeds, each
  seed's value, how many seeds had diverging test tasks and whether the paper's value lies in the
  seeds' range (`mamlrun.analysis.seeds`);
- the sweep table, where runs differ only in `seed`: one row per configuration, its swept keys,
  the objective over its seeds; best first. The plot of the objective against each swept key
  (`sweep_objective.png`) is drawn from the same numbers.

Runs that did not finish are listed with their status, never dropped: a table that hides a failed
cell looks more complete than it is. `mamlrun report` and `mamlrun reproduce` both write these.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamlrun import console
from mamlrun.analysis.formats import csv_cell, format_value, markdown_table, scale, signed_text
from mamlrun.analysis.runs import FINISHED, Run
from mamlrun.analysis.seeds import (
    SEED_COMPARISON_COLUMNS,
    group_by_seed,
    seed_comparison_row,
    seed_of,
    seed_record,
    seeds_text,
)
from mamlrun.analysis.sweep import (
    Group,
    Objective,
    finished_text,
    group_name,
    group_objective,
    group_seeds_text,
    metric_order,
    objective,
    sort_key,
    sorted_groups,
)
from mamlrun.config.compose import parse_overrides
from mamlrun.errors import UserError
from mamlrun.run.evaluation import mean_cell

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


def _group_status(group: list[Run]) -> str:
    """One run's status; a group of seeds: finished when all are, else how many are."""
    if len(group) == 1:
        return group[0].status
    done = sum(r.status == FINISHED for r in group)
    return FINISHED if done == len(group) else f"{done} of {len(group)} finished"


def comparison_records(groups: list[list[Run]]) -> list[dict[str, Any]]:
    """One record per preset, setting and step the paper reports: paper vs mamlrun, raw numbers.

    Each group holds the seeds of one preset. Where some group has several, every record holds
    each seed's value and the statistics over seeds (`mamlrun.analysis.seeds.seed_record`);
    otherwise the one run's mean, 95% CI over test tasks and median. Settings the paper has no
    number for (sinusoid K=10, 20) get records without a paper value; runs without a result get
    records with their status, so no cell goes missing.
    """
    several = any(len(group) > 1 for group in groups)
    records = []
    for group in groups:
        run = next((r for r in group if r.evaluation), group[0])  # the settings it was tested on
        paper = run.config.get("paper")
        if not paper:
            continue
        steps = _as_list(paper.get("steps"), 1)
        values = _as_list(paper.get("value"), len(steps))
        cis = _as_list(paper.get("ci95"), len(steps))
        reference = paper_setting(run)
        iterations = list(dict.fromkeys(_iterations_text(r) for r in group))
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
                    "status": _group_status(group),
                    "iterations": "; ".join(iterations),
                    "budget": run.config.get("budget", 1.0),
                    "tasks": (run.evaluation or {}).get("tasks"),
                }
                if several:
                    record.update(seed_record(group, setting, record["metric"], step))
                    records.append(_compare_seeds(record))
                else:
                    record.update(_run_fields(run, setting, record["metric"], step))
                    records.append(_compare(record))
    return records


def _run_fields(run: Run, setting: str, metric: str, step: int) -> dict[str, Any]:
    """One run's mean, 95% CI and median over test tasks at `setting` after `step` steps."""
    stats = ((run.evaluation or {}).get("results", {}).get(setting) or {}).get(metric)
    if stats is None or step >= len(stats["mean"]):
        return {}
    return {
        "mamlrun_mean": _inf_for_null(stats["mean"][step]),
        "mamlrun_ci95": stats["ci95"][step],
        "mamlrun_median": _inf_for_null(stats["median"][step]),
        "diverged": stats.get("diverged", [0] * (step + 1))[step],
    }


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


def _compare_seeds(record: dict[str, Any]) -> dict[str, Any]:
    """Difference (mean over seeds - paper) and whether the paper's value lies in the seeds'
    range (min <= paper <= max of the seeds' means)."""
    value = record["paper_value"]
    record["difference"] = record["paper_in_range"] = None
    if "seed_means" in record and value is not None:
        record["difference"] = record["mamlrun_mean"] - value
        record["paper_in_range"] = record["seed_min"] <= value <= record["seed_max"]
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
            difference = signed_text(metric, r["difference"])
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


def _names(runs: list[Run], base: Path | None) -> list[str]:
    return [
        str(r.path.relative_to(base)) if base and r.path.is_relative_to(base) else str(r.path)
        for r in runs
    ]


def _ranked(runs: list[Run]) -> list[tuple[Run, Objective]]:
    """The runs with their objectives, best first within each metric (a stable sort: equal
    objectives keep the directory order)."""
    objectives = [objective(run) for run in runs]
    order = metric_order(objectives)
    pairs = list(zip(runs, objectives, strict=True))

    def key(pair: tuple[Run, Objective]):
        goal = pair[1]
        return sort_key(order, goal.metric, goal.higher_is_better, goal.value)

    return sorted(pairs, key=key)


def _objective_text(o: Objective) -> str:
    if o.value is None:
        return "–"
    text = format_value(o.metric, o.value)
    if o.diverged:
        text += f" ({o.diverged} diverged)"
    return text + (f" (val @{o.step})" if o.source == "val" else "")


def results_table(runs: list[Run], base: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Any runs, best objective first: swept keys, status, final validation metric, the objective
    (`mamlrun.analysis.sweep`), test metric ± 95% CI per setting, wall time."""
    ranked = _ranked(runs)
    runs = [run for run, _ in ranked]
    overrides = [_override_values(r) for r in runs]
    swept = _swept_keys(overrides)
    names = _names(runs, base)
    # A key that only repeats the run's name (reproduce's `experiment`) adds nothing.
    swept = [k for k in swept if [o.get(k) for o in overrides] != names]
    settings: list[tuple[str, str]] = []  # (setting label, metric) across runs, in first-seen order
    for run in runs:
        for label in (run.evaluation or {}).get("results", {}):
            if (label, run.metric) not in settings:
                settings.append((label, run.metric))
    columns = ["run", *swept, "status", "iterations", "val (last)", "objective"]
    columns += [f"test {label} {metric}" for label, metric in settings]
    columns.append("wall")
    rows = []
    for (run, goal), name, values in zip(ranked, names, overrides, strict=True):
        row = [name, *(values.get(k, "–") for k in swept), run.status]
        row += [_iterations_text(run), _val_text(run), _objective_text(goal)]
        for label, metric in settings:
            result = (run.evaluation or {}).get("results", {}).get(label)
            if result is None or run.metric != metric:
                row.append("–")
                continue
            last = run.evaluation["inner_steps"]
            factor, digits, unit = scale(metric)
            row.append(f"{mean_cell(result[metric], last, factor, digits, unit)} @{last}")
        row.append("–" if run.seconds is None else f"{run.seconds:.0f} s")
        rows.append(row)
    return columns, rows


def sweep_groups(groups: list[list[Run]], base: Path | None) -> tuple[list[Group], list[str]]:
    """The configurations of a sweep (seeds together), best mean objective first, and the keys
    that vary between them (`seed` never: it is what the groups aggregate)."""
    named = [group_objective(group_name(g, _names(g, base), base), g) for g in groups]
    named = sorted_groups(named)
    values = [_values_but_seed(g) for g in named]
    keys = _swept_keys(values) if len(named) > 1 else []
    keys = [k for k in keys if [v.get(k) for v in values] != [g.name for g in named]]
    return named, keys


def _values_but_seed(group: Group) -> dict[str, str]:
    return {k: v for k, v in _override_values(group.runs[0]).items() if k != "seed"}


SWEEP_COLUMNS = [
    "status",
    "seeds",
    "objective",
    "mean over seeds ± std",
    "median over seeds",
    "each seed",
    "seeds diverged",
]


def sweep_rows(groups: list[Group], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per configuration: its swept keys, seeds, and its objective over them."""
    rows = []
    for group in groups:
        values = _values_but_seed(group)
        row = [group.name, *(values.get(k, "–") for k in keys), finished_text(group.runs)]
        row += [group_seeds_text(group), group.label]
        seeds = group.objective
        if seeds is None:
            rows.append(row + ["–"] * 4)
            continue
        metric = group.metric
        mean = format_value(metric, seeds.mean, seeds.std)
        if seeds.diverged_seeds:
            mean = f"inf ({seeds.diverged_seeds} of {len(seeds)} seeds diverged)"
        each = " / ".join(format_value(metric, v) for v in seeds.values)
        diverged = f"{seeds.diverged_seeds} of {len(seeds)}"
        rows.append(row + [mean, format_value(metric, seeds.median), each, diverged])
    return ["runs", *keys, *SWEEP_COLUMNS], rows


def sweep_panels(groups: list[Group], keys: list[str]) -> tuple[dict[str, list], str]:
    """What the sweep plot draws, per swept key: (the key's value, each seed's objective) per
    configuration with a number; configurations of another metric than the first are left out."""
    drawn = [g for g in groups if g.objective is not None and g.metric == groups[0].metric]
    if len(drawn) < 2 or not keys:
        return {}, ""
    panels = {
        key: [(_values_but_seed(g).get(key, "–"), g.objective.values) for g in drawn]
        for key in keys
    }
    labels = {g.label for g in drawn}
    label = labels.pop() if len(labels) == 1 else f"test {drawn[0].metric}, each run's trained K"
    better = "higher" if drawn[0].objective.higher_is_better else "lower"
    return panels, f"{label} ({better} is better)"


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


def _threads_text(threads: int | None) -> str:
    return "all threads" if not threads else f"{threads} thread{'s' * (threads != 1)}"


def hardware_text(runs: list[Run]) -> str:
    """What the runs asked for, and the machine the table was made on (reproduce runs there)."""
    asked = sorted(
        {
            f"{r.config['hardware'].get('device')} "
            f"({_threads_text(r.config['hardware'].get('threads') or r.threads)})"
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


@dataclass
class Tables:
    """The tables of a set of runs, as text rows, the raw comparison records (for CSV) and what
    the sweep plot draws."""

    header: list[str]
    records: list[dict[str, Any]]
    comparison: list[list[str]]
    columns: list[str]
    rows: list[list[str]]
    comparison_columns: list[str] = field(default_factory=lambda: list(COMPARISON_COLUMNS))
    sweep_columns: list[str] = field(default_factory=list)
    sweep_rows: list[list[str]] = field(default_factory=list)  # only where seeds repeat
    panels: dict[str, list] = field(default_factory=dict)  # key -> [(value, seeds' objective)]
    objective: str = ""  # what the panels' y axis is
    groups: list[list[Run]] = field(default_factory=list)  # the runs, seeds together


def _seed_lines(runs: list[Run], groups: list[list[Run]]) -> list[str]:
    """What the seed columns mean, where some configuration has several seeds."""
    seeds = seeds_text(sorted({s for r in runs if (s := seed_of(r)) is not None}))
    sizes = sorted({len(g) for g in groups})
    return [
        f"seeds {seeds}, {'/'.join(map(str, sizes))} per configuration, aggregated: the mean over "
        "seeds of each seed's mean over test tasks ± the sample std over seeds (inf where a "
        "seed's test tasks diverged), the median over seeds, and each seed's value"
    ]


def _objective_lines(runs: list[Run]) -> list[str]:
    labels = sorted({objective(r).label for r in runs if objective(r).value is not None})
    if len(runs) < 2 or not labels:
        return []
    return [
        f"runs sorted by the objective, {', '.join(labels)} (test: mean over test tasks at the K "
        "the run trained with, after the last test step; val: a run without eval.json, its last "
        "validation); accuracy best high, MSE best low"
    ]


def build_tables(
    runs: list[Run], base: Path | None = None, groups: list[list[Run]] | None = None
) -> Tables:
    """The comparison (runs with a paper reference), the results table (every run), and where
    runs differ only in `seed`, the sweep table with the seeds aggregated.

    Args:
        groups: the runs as seeds of one configuration each; by default those that differ only
            in `seed` (`mamlrun.analysis.seeds.group_by_seed`).
    """
    groups = groups if groups is not None else group_by_seed(runs)
    several = any(len(g) > 1 for g in groups)
    records = comparison_records(groups)
    columns, rows = results_table(runs, base)
    header = header_lines(runs) + (_seed_lines(runs, groups) if several else [])
    tables = Tables(header + _objective_lines(runs), records, [], columns, rows, groups=groups)
    if several:
        seeds = sorted({s for r in runs if (s := seed_of(r)) is not None})
        tables.comparison = [seed_comparison_row(r, seeds) for r in records]
        tables.comparison_columns = list(SEED_COMPARISON_COLUMNS)
    else:
        tables.comparison = comparison_rows(records)
    configurations, keys = sweep_groups(groups, base)
    if several:
        tables.sweep_columns, tables.sweep_rows = sweep_rows(configurations, keys)
    tables.panels, tables.objective = sweep_panels(configurations, keys)
    return tables


def print_tables(tables: Tables, title: str) -> None:
    if tables.comparison:
        what = "mean over seeds ± std" if tables.sweep_rows else "mean ± 95% CI"
        console.print_table(
            f"{title}: paper vs mamlrun ({what})", tables.comparison_columns, tables.comparison
        )
    console.print_table(f"{title}: runs", tables.columns, tables.rows)
    if tables.sweep_rows:
        console.print_table(
            f"{title}: configurations, seeds aggregated", tables.sweep_columns, tables.sweep_rows
        )
    for line in tables.header:
        console.info(line)


COMPARISON_NOTE = (
    "Mean ± 95% CI over test tasks; difference = mamlrun − paper. `*`: the paper gives no CI; "
    "overlap then means the paper's value lies in mamlrun's interval."
)
SEED_COMPARISON_NOTE = (
    "mamlrun: the mean over seeds of each seed's mean over test tasks ± the sample std over "
    "seeds, inf where a seed's test tasks diverged (seeds diverged: how many seeds, and how many "
    "tasks each); median over seeds: of the same per-seed means; each seed: in seed order, – "
    "where a seed has no result; paper in seeds' range: min ≤ paper ≤ max of the seeds' means; "
    "median over tasks: each seed's median over test tasks, then the median over seeds; "
    "difference = mean over seeds − paper."
)


def _comparison_markdown(tables: Tables, runs: list[Run], out: Path) -> list[str]:
    """The comparison's Markdown section, with comparison.csv (one field per seed list)."""
    references = {
        r.preset: f"{r.config['paper']['table']}: {r.config['paper']['cell']}"
        for r in runs
        if r.config.get("paper")
    }
    note = SEED_COMPARISON_NOTE if tables.sweep_rows else COMPARISON_NOTE
    with (out / "comparison.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in tables.records for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in tables.records)
    return [
        "## Paper vs mamlrun",
        "",
        markdown_table(tables.comparison_columns, tables.comparison),
        note,
        "",
        *(f"- {k}: {v}" for k, v in references.items()),
        "",
    ]


def write_tables(tables: Tables, runs: list[Run], out: Path, title: str) -> list[Path]:
    """Write the tables to `out`; returns the files written.

    comparison.md / comparison.csv when some run has a paper reference (the Markdown also holds
    the runs table), else results.md; results.csv always; sweep.csv where seeds repeat; for
    sinusoid presets a Figure-3-style plot, sinusoid_k5_steps.png; where keys were swept,
    sweep_objective.png (`write_sweep_plot`).
    """
    out.mkdir(parents=True, exist_ok=True)
    markdown = [f"# {title}", "", *(f"- {line}" for line in tables.header), ""]
    written = []
    if tables.records:
        markdown += _comparison_markdown(tables, runs, out)
        written.append(out / "comparison.csv")
        plot = _sinusoid_plot(tables.groups, out)
        if plot is not None:
            markdown += [f"![test MSE vs gradient steps, K=5]({plot.name})", ""]
            written.append(plot)
    markdown += ["## Runs", "", markdown_table(tables.columns, tables.rows)]
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([tables.columns, *tables.rows])
    written.append(out / "results.csv")
    if tables.sweep_rows:
        markdown += ["", "## Configurations, seeds aggregated", ""]
        markdown.append(markdown_table(tables.sweep_columns, tables.sweep_rows))
        with (out / "sweep.csv").open("w", newline="") as f:
            csv.writer(f).writerows([tables.sweep_columns, *tables.sweep_rows])
        written.append(out / "sweep.csv")
    sweep_plot = write_sweep_plot(tables, out)
    if sweep_plot is not None:
        markdown += ["", f"![{tables.objective} against each swept key]({sweep_plot.name})", ""]
        written.append(sweep_plot)
    path = out / ("comparison.md" if tables.records else "results.md")
    path.write_text("\n".join(markdown))
    return [path, *written]


SWEEP_PLOT = "sweep_objective.png"


def write_sweep_plot(tables: Tables, directory: Path) -> Path | None:
    """The objective against each swept key (one panel each) as `directory/sweep_objective.png`;
    None where no key was swept.

    Raises:
        UserError: a file of that name that mamlrun did not write is there (never overwritten).
    """
    if not tables.panels:
        return None
    from mamlrun.run.plots import sweep_plot, written_by_mamlrun  # matplotlib: only to draw

    path = directory / SWEEP_PLOT
    if path.exists() and not written_by_mamlrun(path):
        raise UserError(
            f"{path}: a file mamlrun did not write is in the way of the sweep plot; move it, or "
            "give --out DIR"
        )
    return sweep_plot(tables.panels, tables.objective, path)


def _seed_curve(group: list[Run]) -> dict[str, list] | None:
    """A preset's K=5 MSE against steps: one run's eval.json statistics, or for several seeds the
    mean over seeds (null where a seed diverged), the median over seeds of each seed's median
    over tasks, and each seed's mean."""
    evaluations = [r.evaluation for r in group if r.evaluation]
    stats = [
        e["results"]["K=5"]["mse"]
        for e in evaluations
        if e["dataset"] == "sinusoid" and "K=5" in e["results"]
    ]
    if len(stats) <= 1:
        return stats[0] if stats else None
    steps = min(len(s["mean"]) for s in stats)
    means = [[_inf_for_null(s["mean"][i]) for i in range(steps)] for s in stats]
    medians = [[_inf_for_null(s["median"][i]) for i in range(steps)] for s in stats]
    return {
        "mean": [sum(column) / len(column) for column in zip(*means, strict=True)],
        "median": [statistics.median(column) for column in zip(*medians, strict=True)],
        "seeds": means,
    }


def _sinusoid_plot(groups: list[list[Run]], out: Path) -> Path | None:
    """Figure 3 of the paper: K=5 test MSE against gradient steps, each sinusoid preset (its
    seeds together)."""
    from mamlrun.run.plots import adaptation_comparison  # matplotlib: only to draw

    curves, references, plotted = {}, {}, []
    for group in groups:
        curve = _seed_curve(group)
        if curve is None:
            continue
        run = next(r for r in group if r.evaluation)
        curves[run.preset] = curve
        plotted += group
        paper = run.config.get("paper") or {}
        if paper_setting(run) == "K=5" and paper.get("value") is not None:
            references[run.preset] = (_as_list(paper["steps"], 1), _as_list(paper["value"], 1))
    if not curves:
        return None
    budgets = _budgets(plotted)
    title = "sinusoid, K=5 (paper Figure 3)"
    if budgets != [1.0]:
        title += f", budget {', '.join(f'{b:g}' for b in budgets)}"
    return adaptation_comparison(curves, references, "mse", title, out / "sinusoid_k5_steps.png")
