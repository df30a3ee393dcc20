"""Seeds of one configuration: runs that differ only in `seed`, and statistics over them.

One seed's test mean is one draw of a heavy-tailed statistic: on sinusoid K=5 after 10 steps a
single test task that diverges makes a seed's mean infinite while its median barely moves, and
which tasks diverge depends on the trained model. A table that compares with the paper's single
number therefore needs every seed's value, their mean and spread, how many seeds had diverging
tasks, and a robust summary (the median over seeds) that still says something when some did.

eval.json writes a non-finite mean as null (`mamlrun.run.jsonio`); here it is the worst value
(+inf for a loss, -inf for an accuracy), as the test table's median counts a diverged task.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from mamlrun.analysis.formats import format_value, signed_text
from mamlrun.analysis.runs import FINISHED, Run
from mamlrun.config.compose import parse_overrides


def worst(higher_is_better: bool) -> float:
    return -math.inf if higher_is_better else math.inf


def finite_or_worst(value: float | None, higher_is_better: bool) -> float:
    """eval.json's null (or an older file's NaN / Infinity) as the worst value."""
    if value is None or not math.isfinite(value):
        return worst(higher_is_better)
    return float(value)


def seed_of(run: Run) -> int | None:
    """The seed the run trained with, from its own config (not from its overrides: a run
    started without `seed=` has the default)."""
    seed = run.config.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _group_key(run: Run) -> str:
    """The run's overrides but `seed`, as Hydra types them (`print_config=false` as typed and
    Hydra's recorded `print_config=False` are the same): runs with equal keys are seeds of one
    configuration."""
    values = {
        o.key: o.value for o in parse_overrides(run.overrides) if not o.is_hydra and o.key != "seed"
    }
    return json.dumps(values, sort_keys=True, default=str)


def group_by_seed(runs: list[Run]) -> list[list[Run]]:
    """The runs in groups that differ only in `seed`, in first-seen order, each sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    return [sorted(g, key=lambda r: (seed_of(r) is None, seed_of(r) or 0)) for g in groups.values()]


@dataclass
class SeedValues:
    """One number per seed of a configuration (a test mean at one setting and step, or the
    objective), with the summaries the tables print."""

    seeds: list[int | None]
    values: list[float]  # the worst value where the seed's test tasks diverged
    diverged_tasks: list[int]  # per seed, test tasks that diverged there (0: none)
    higher_is_better: bool = False

    def __len__(self) -> int:
        return len(self.values)

    @property
    def diverged_seeds(self) -> int:
        pairs = zip(self.values, self.diverged_tasks, strict=True)
        return sum(d > 0 or not math.isfinite(v) for v, d in pairs)

    @property
    def mean(self) -> float:
        """The mean over seeds of each seed's value: infinite where a seed diverged."""
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        """The sample standard deviation over seeds (ddof=1); None for one seed or a diverged
        one."""
        if len(self.values) < 2 or not all(math.isfinite(v) for v in self.values):
            return None
        return statistics.stdev(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def contains(self, value: float) -> bool:
        """Whether `value` lies in the seeds' range, min <= value <= max."""
        return self.low <= value <= self.high


def step_values(
    group: list[Run], setting: str, metric: str, step: int
) -> tuple[SeedValues, SeedValues] | None:
    """Each seed's test mean and its median over tasks at `setting` after `step` steps; seeds
    without that result (unfinished, or a shorter evaluation) are left out, None if all are."""
    seeds, means, medians, diverged = [], [], [], []
    higher = False
    for run in group:
        evaluation = run.evaluation or {}
        stats = (evaluation.get("results", {}).get(setting) or {}).get(metric)
        if stats is None or step >= len(stats["mean"]):
            continue
        higher = bool(evaluation.get("higher_is_better", metric == "acc"))
        seeds.append(seed_of(run))
        means.append(finite_or_worst(stats["mean"][step], higher))
        medians.append(finite_or_worst(stats["median"][step], higher))
        diverged.append(int(stats.get("diverged", [0] * (step + 1))[step]))
    if not seeds:
        return None
    return (
        SeedValues(seeds, means, diverged, higher),
        SeedValues(seeds, medians, [0] * len(seeds), higher),
    )


def seed_record(group: list[Run], setting: str, metric: str, step: int) -> dict[str, Any]:
    """A comparison record's fields over the seeds of `group` (raw numbers, lists per seed)."""
    found = step_values(group, setting, metric, step)
    if found is None:
        return {"seeds": [seed_of(r) for r in group]}
    means, medians = found
    return {
        "seeds": means.seeds,
        "seed_means": means.values,
        "seed_diverged_tasks": means.diverged_tasks,
        "mamlrun_mean": means.mean,
        "seed_std": means.std,
        "seed_median": means.median,
        "seed_min": means.low,
        "seed_max": means.high,
        "seeds_diverged": means.diverged_seeds,
        "mamlrun_median": medians.median,  # each seed's median over tasks, then over seeds
    }


def seeds_text(seeds: list[int | None]) -> str:
    """`0–4` for consecutive seeds, else `0, 2, 5`."""
    known = [s for s in seeds if s is not None]
    if len(known) > 2 and known == list(range(known[0], known[0] + len(known))):
        return f"{known[0]}–{known[-1]}"
    return ", ".join("?" if s is None else str(s) for s in seeds)


# The comparison's columns where some cell has several seeds (one seed: tables.COMPARISON_COLUMNS).
SEED_COMPARISON_COLUMNS = [
    "preset",
    "setting",
    "steps",
    "paper",
    "mamlrun: mean over seeds ± std",
    "median over seeds",
    "each seed",
    "seeds diverged",
    "paper in seeds' range",
    "median over tasks",
    "difference",
    "iterations",
    "status",
]


def _each_seed(record: dict[str, Any], table_seeds: list[int | None]) -> str:
    """Every seed's value in `table_seeds` order, `–` where that seed has none."""
    values = dict(zip(record["seeds"], record.get("seed_means", []), strict=False))
    return " / ".join(
        format_value(record["metric"], values[s]) if s in values else "–" for s in table_seeds
    )


def _diverged_text(record: dict[str, Any]) -> str:
    """`2 of 5 (1, 3 of 600 tasks)`: how many seeds had test tasks diverge, and how many tasks."""
    count, seeds = record["seeds_diverged"], len(record["seed_means"])
    text = f"{count} of {seeds}"
    if count:
        tasks = [str(d) for d in record["seed_diverged_tasks"] if d]
        text += f" ({', '.join(tasks)} of {record.get('tasks') or '?'} tasks)"
    return text


def seed_comparison_row(record: dict[str, Any], table_seeds: list[int | None]) -> list[str]:
    """SEED_COMPARISON_COLUMNS as text for one record (`seed_record` fields and the paper's)."""
    metric = record["metric"]
    paper = "–"
    if record["paper_value"] is not None:
        paper = format_value(metric, record["paper_value"], record["paper_ci95"])
    cells = ["–"] * 6
    if "seed_means" in record:
        mean = record["mamlrun_mean"]
        if record["seeds_diverged"]:
            mean_text = f"inf ({record['seeds_diverged']} of {len(record['seed_means'])} seeds "
            mean_text += "diverged)"
        else:
            mean_text = format_value(metric, mean, record["seed_std"])
        cells = [
            mean_text,
            format_value(metric, record["seed_median"]),
            _each_seed(record, table_seeds),
            _diverged_text(record),
            "–",
            format_value(metric, record["mamlrun_median"]),
        ]
        if record["paper_value"] is not None:
            inside = "yes" if record["paper_in_range"] else "no"
            low, high = (format_value(metric, record[k]) for k in ("seed_min", "seed_max"))
            cells[4] = f"{inside} ({low} to {high})"
    difference = "–"
    if record.get("difference") is not None:
        difference = signed_text(metric, record["difference"])
    name = record["preset"].rsplit("/", 1)[-1]  # finn2017/omniglot_5w1s: the CSV has it all
    status = "ok" if record["status"] == FINISHED else record["status"]
    row = [name, record["setting"], str(record["steps"]), paper, *cells, difference]
    return [*row, record["iterations"], status]
