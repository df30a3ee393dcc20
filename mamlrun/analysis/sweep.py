"""A sweep's objective, its runs sorted by it, seeds aggregated, and the plot against each key.

The objective of a run is the number a sweep is judged by: the test metric (mean over test tasks)
after the last test step (`eval.inner_steps`, the step the results table reports) at the K the run
trained with (`dataset.shots`; validation scores that K too), read from eval.json. A run without
eval.json (unfinished, failed after validating) falls back to its last validation row's metric
after the most steps, marked `val`. Accuracy sorts descending, MSE ascending; a diverged value is
the worst (`mamlrun.analysis.seeds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mamlrun.analysis.runs import FINISHED, Run
from mamlrun.analysis.seeds import SeedValues, finite_or_worst, seed_of, seeds_text


@dataclass
class Objective:
    """What a run is sorted by, and where the number comes from."""

    value: float | None  # None: neither a test result nor a validation row
    source: str  # "test" or "val"
    setting: str  # "K=10", "5-way 1-shot"
    metric: str
    step: int
    higher_is_better: bool
    diverged: int = 0  # test tasks that diverged there

    @property
    def label(self) -> str:
        return f"{self.source} {self.setting} {self.metric} @{self.step}"


def _trained_setting(run: Run) -> str | None:
    """The eval.json setting with the K the run trained with, else its first."""
    results = run.evaluation["results"]
    shots = (run.config.get("dataset") or {}).get("shots")
    named = [label for label, result in results.items() if result.get("shots") == shots]
    return named[0] if named else next(iter(results), None)


def objective(run: Run) -> Objective:
    """The run's objective: test metric at its trained K after the last step, else validation."""
    metric = run.metric
    higher = bool((run.evaluation or {}).get("higher_is_better", metric == "acc"))
    setting = _trained_setting(run) if run.evaluation else None
    if setting is not None:
        step = run.evaluation["inner_steps"]
        stats = run.evaluation["results"][setting][metric]
        diverged = stats.get("diverged", [0] * (step + 1))[step]
        value = finite_or_worst(stats["mean"][step], higher)
        return Objective(value, "test", setting, metric, step, higher, int(diverged))
    prefix = f"{metric}_step"
    steps = [int(k[len(prefix) :]) for k in (run.val or {}) if k.startswith(prefix)]
    if not steps:
        return Objective(None, "val", "–", metric, 0, higher)
    value = finite_or_worst(run.val[f"{prefix}{max(steps)}"], higher)
    return Objective(value, "val", _setting_name(run), metric, max(steps), higher)


def _setting_name(run: Run) -> str:
    """The trained setting named as eval.json names it (`K=10`, `5-way 1-shot`)."""
    dataset = run.config.get("dataset") or {}
    if dataset.get("name") == "sinusoid":
        return f"K={dataset.get('shots')}"
    return f"{dataset.get('ways')}-way {dataset.get('shots')}-shot"


def sort_key(metric_order: list[str], metric: str, higher: bool, *values: float | None):
    """Best first within each metric (in `metric_order`), runs without a number last."""
    signed = [math.inf if v is None else (-v if higher else v) for v in values]
    return (metric_order.index(metric), values[0] is None, *signed)


def metric_order(objectives: list[Objective]) -> list[str]:
    return list(dict.fromkeys(o.metric for o in objectives))


@dataclass
class Group:
    """One configuration of a sweep: its runs (seeds), name, and objective over seeds."""

    name: str
    runs: list[Run]
    objective: SeedValues | None  # None: no seed has a number
    label: str  # the objective's description, `test K=10 mse @10`
    metric: str


def group_objective(name: str, runs: list[Run]) -> Group:
    """The objective over the group's seeds: their test values where some seed has one (the
    others have not finished), else their validation values."""
    objectives = [(seed_of(r), objective(r)) for r in runs]
    tests = [(s, o) for s, o in objectives if o.source == "test"]
    chosen = tests or [(s, o) for s, o in objectives if o.value is not None]
    metric = objectives[0][1].metric
    if not chosen:
        return Group(name, runs, None, "–", metric)
    first = chosen[0][1]
    label = first.label if all(o.label == first.label for _, o in chosen) else first.source
    values = SeedValues(
        [s for s, _ in chosen],
        [o.value for _, o in chosen],
        [o.diverged for _, o in chosen],
        first.higher_is_better,
    )
    return Group(name, runs, values, label, first.metric)


def sorted_groups(groups: list[Group]) -> list[Group]:
    """Best mean over seeds first (the median over seeds breaks ties: several infinite means),
    within each metric."""
    order = list(dict.fromkeys(g.metric for g in groups))

    def key(group: Group):
        values = group.objective
        higher = values.higher_is_better if values else False
        numbers = (values.mean, values.median) if values else (None, None)
        return (*sort_key(order, group.metric, higher, *numbers), group.name)

    return sorted(groups, key=key)


def group_name(runs: list[Run], names: list[str], base: Path | None) -> str:
    """A group's name: its runs' shared folder (reproduce's `finn2017/<cell>` of `seed<k>/`
    runs), else their names joined."""
    parents = {r.path.parent for r in runs}
    if len(runs) > 1 and len(parents) == 1:
        parent = parents.pop()
        if base is None or (parent != base and parent.is_relative_to(base)):
            return str(parent.relative_to(base)) if base else str(parent)
    return ", ".join(names)


def finished_text(runs: list[Run]) -> str:
    done = sum(r.status == FINISHED for r in runs)
    return "ok" if done == len(runs) else f"{done} of {len(runs)} finished"


def group_seeds_text(group: Group) -> str:
    return seeds_text([seed_of(r) for r in group.runs])
