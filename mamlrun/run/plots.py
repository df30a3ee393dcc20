"""PNG plots of a run: learning curves, the test metric over adaptation steps (paper Figure 3
style) and, for sinusoid, fits before and after adaptation (paper Figure 2 style).

Pure drawing: numbers in, a PNG at the given path out. What to draw (the adapted predictions) is
computed by `mamlrun.run.evaluation`; matplotlib is imported only when there is a plot to draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _floats(values: list[float | None], null: float) -> torch.Tensor:
    """A list of eval.json numbers as a tensor, a null (a non-finite value) as `null`."""
    return torch.tensor([null if v is None else v for v in values], dtype=torch.float64)


def _save(fig: plt.Figure, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def learning_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Meta-train query loss before/after adaptation, and the validation metric, vs iteration."""
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss_pre", "before adaptation"), ("loss_post", "after adaptation")):
        ax_train.plot([r["iteration"] for r in train], [r[key] for r in train], label=label)
    ax_train.set(xlabel="iteration", ylabel="meta-train query loss", title="meta-training")
    if train and all(r["loss_post"] > 0 for r in train):
        ax_train.set_yscale("log")
    if val:
        steps = sorted(
            {int(k.rsplit("step", 1)[1]) for k in val[0] if k.startswith(f"{metric}_step")}
        )
        for step in (steps[0], 1, steps[-1]):
            if step in steps:
                key, label = f"{metric}_step{step}", f"{step} step{'s' * (step != 1)}"
                ax_val.plot([r["iteration"] for r in val], [r[key] for r in val], label=label)
        ax_val.set(xlabel="iteration", ylabel=f"validation {metric}", title="validation")
    for ax in (ax_train, ax_val):
        if ax.has_data():
            ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def adaptation_plot(report: dict[str, Any], path: Path) -> Path:
    """Test metric (mean ± 95% CI, and median) against adaptation steps, one line per setting."""
    curves = {label: result[report["metric"]] for label, result in report["results"].items()}
    title = f"{report['algorithm']}, test"
    return adaptation_comparison(curves, {}, report["metric"], title, path)


@dataclass
class SinusoidFit:
    """One sinusoid test task for Figure 2: its curve, its K support points, and the adapted
    model's predictions on `grid` after each number of steps."""

    shots: int
    grid: torch.Tensor  # [points, 1]
    truth: torch.Tensor  # [points, 1]
    support_x: torch.Tensor
    support_y: torch.Tensor
    predictions: dict[int, torch.Tensor]


FIT_STYLES = {0: ":", 1: "--", 10: "-"}  # line style per number of steps


def sinusoid_fits(fits: list[SinusoidFit], x_range: list[float], path: Path) -> Path:
    """Ground truth, the K support points, and predictions after 0, 1 and 10 steps (Figure 2):
    one row per K, one column per task."""
    shots = list(dict.fromkeys(fit.shots for fit in fits))
    count = len(fits) // len(shots)
    fig, axes = plt.subplots(
        len(shots), count, figsize=(4 * count, 3.2 * len(shots)), squeeze=False
    )
    for index, fit in enumerate(fits):
        row, col = divmod(index, count)
        ax = axes[row][col]
        ax.plot(fit.grid, fit.truth, color="red", label="ground truth")
        ax.scatter(
            fit.support_x,
            fit.support_y,
            marker="^",
            color="purple",
            zorder=3,
            label="used for grad",
        )
        for step, prediction in fit.predictions.items():
            name = "pre-update" if step == 0 else f"{step} grad step{'s' * (step > 1)}"
            ax.plot(fit.grid, prediction, FIT_STYLES[step], color="green", label=name)
        ax.set_title(f"K={fit.shots}, task {col + 1}")
        ax.set_xlim(*x_range)
    axes[0][0].legend(fontsize=7, loc="lower left")
    return _save(fig, path, dpi=110)


def adaptation_comparison(
    curves: dict[str, dict[str, list[float]]],
    references: dict[str, tuple[list[int], list[float]]],
    metric: str,
    title: str,
    path: Path,
) -> Path:
    """Test metric (mean ± 95% CI) vs adaptation steps for several runs, with the paper's numbers
    as crosses in the same color (paper Figure 3: MAML against the pretrained baseline).

    Args:
        curves: label -> eval.json statistics of one setting (`mean`, `ci95` per step).
        references: label -> (steps, values) the paper reports for that run.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, stats in curves.items():
        # eval.json's nulls: a diverged mean or median as +inf (as the median counts it), a CI nan
        mean, ci = _floats(stats["mean"], math.inf), _floats(stats["ci95"], math.nan)
        steps = torch.arange(len(mean))
        (line,) = ax.plot(steps, mean, marker="o", label=f"{label} (mamlrun mean)")
        low = mean - ci if metric != "mse" else (mean - ci).clamp_min(float(mean.min()) / 4)
        ax.fill_between(steps, low, mean + ci, alpha=0.2, color=line.get_color())
        if "median" in stats:  # a few diverging tasks can dominate the mean: show both
            ax.plot(
                steps,
                _floats(stats["median"], math.inf),
                "--",
                color=line.get_color(),
                label=f"{label} (mamlrun median)",
            )
        if label in references:
            ref_steps, values = references[label]
            ax.plot(
                ref_steps,
                values,
                "x",
                markersize=9,
                color=line.get_color(),
                label=f"{label} (paper)",
            )
    ax.set(xlabel="number of gradient steps", ylabel=f"test {metric}", title=title)
    if metric == "mse" and _drawable_on_log_scale(curves):
        ax.set_yscale("log")  # outlier tasks' spikes would flatten the rest (band cut at > 0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _drawable_on_log_scale(curves: dict[str, dict[str, list]]) -> bool:
    """Whether some mean or median is finite and positive: where every task diverged from the
    start there is nothing a log scale can show (matplotlib refuses it)."""
    values = [
        v for stats in curves.values() for key in ("mean", "median") for v in stats.get(key, [])
    ]
    return any(v is not None and math.isfinite(v) and v > 0 for v in values)
