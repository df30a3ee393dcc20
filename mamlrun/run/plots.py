"""PNG plots of a run: learning curves, the test metric over adaptation steps (paper Figure 3
style) and, for sinusoid, fits before and after adaptation (paper Figure 2 style); of
`mamlrun adapt`: a confusion matrix, or a regression fit before and after adaptation.

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


# Written into every PNG's `Software` field: a later report replaces only files that carry it.
MARK = "mamlrun"


def _save(fig: plt.Figure, path: Path, dpi: int = 120, description: str = "") -> Path:
    fig.tight_layout()
    metadata = {"Software": MARK, **({"Description": description} if description else {})}
    fig.savefig(path, dpi=dpi, metadata=metadata)
    plt.close(fig)
    return path


def written_by_mamlrun(path: Path) -> bool:
    """Whether the PNG at `path` carries mamlrun's mark (anything else is someone's file)."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == MARK
    except (OSError, ValueError):
        return False


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


def confusion_matrix(counts: torch.Tensor, names: list[str], path: Path) -> Path:
    """counts[true, predicted] as a heat map with the counts written in, rows normalized."""
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(counts / totals, cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in zip(
        [(r, c) for r in range(len(names)) for c in range(len(names))],
        counts.flatten().tolist(),
        strict=True,
    ):
        share = value / float(totals[row])
        ax.text(
            col,
            row,
            str(int(value)),
            ha="center",
            va="center",
            color="white" if share > 0.5 else "black",
        )
    ticks = list(range(len(names)))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    accuracy = float(counts.diag().sum() / counts.sum().clamp(min=1))
    ax.set(xlabel="predicted", ylabel="true class", title=f"adapted: accuracy {accuracy:.1%}")
    return _save(fig, path)


def adapted_fit(
    x: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    support: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    path: Path,
) -> Path:
    """A regression task's support points and the model's predictions on `x` before and after
    `steps` adaptation steps (1-D inputs)."""
    order = x[:, 0].argsort()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x[order, 0], before[order, 0], ":", color="green", label="pre-update")
    label = f"after {steps} grad step{'s' * (steps != 1)}"
    ax.plot(x[order, 0], after[order, 0], "-", color="green", label=label)
    ax.scatter(
        support[0][:, 0],
        support[1][:, 0],
        marker="^",
        color="purple",
        zorder=3,
        label="support points",
    )
    ax.set(xlabel="x", ylabel="y", title="mamlrun adapt")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


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
        curves: label -> eval.json statistics of one setting (`mean`, `ci95`, `median` per
            step); for several seeds `mean` over seeds, no `ci95`, and `seeds`: each seed's mean.
        references: label -> (steps, values) the paper reports for that run.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, stats in curves.items():
        # eval.json's nulls: a diverged mean or median as +inf (as the median counts it), a CI nan
        mean = _floats(stats["mean"], math.inf)
        steps = torch.arange(len(mean))
        over = " over seeds" if "seeds" in stats else ""
        (line,) = ax.plot(steps, mean, marker="o", label=f"{label} (mamlrun mean{over})")
        if "ci95" in stats:
            ci = _floats(stats["ci95"], math.nan)
            low = mean - ci if metric != "mse" else (mean - ci).clamp_min(float(mean.min()) / 4)
            ax.fill_between(steps, low, mean + ci, alpha=0.2, color=line.get_color())
        for index, seed in enumerate(stats.get("seeds", [])):  # each seed's mean, thin
            name = f"{label} (each seed)" if index == 0 else None
            ax.plot(
                steps,
                _floats(seed, math.inf),
                lw=0.8,
                alpha=0.4,
                color=line.get_color(),
                label=name,
            )
        if "median" in stats:  # a few diverging tasks can dominate the mean: show both
            ax.plot(
                steps,
                _floats(stats["median"], math.inf),
                "--",
                color=line.get_color(),
                label=f"{label} (mamlrun median{over})",
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


def _numbers(values: list[str]) -> list[float] | None:
    """The values as numbers, if every one is (`0.01`, `1e-3`, `5`); None for categories."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _positions(ax: plt.Axes, values: list[str]) -> list[float]:
    """x positions of a key's values: numbers on a numeric axis (logarithmic where positive and
    spread over two decades, as learning rates are), anything else as categories in sorted order."""
    numbers = _numbers(values)
    if numbers is not None:
        if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        return numbers
    categories = sorted(set(values))
    ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    return [float(categories.index(v)) for v in values]


def sweep_plot(panels: dict[str, list[tuple[str, list[float]]]], ylabel: str, path: Path) -> Path:
    """The objective against each swept key, one panel per key (sharing the y axis): every
    seed's value as a dot, the seeds' range as a line, the mean over seeds as a diamond, and a
    seed whose value is infinite (its test tasks diverged) as a red triangle above the frame.

    Args:
        panels: key -> one (the key's value as written, each seed's objective) per configuration.
        ylabel: what the objective is, and its direction.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    finite = [v for points in panels.values() for _, vs in points for v in vs if math.isfinite(v)]
    log_y = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 30
    for ax, (key, points) in zip(axes[0], panels.items(), strict=True):
        xs = _positions(ax, [value for value, _ in points])
        for x, (_, values) in zip(xs, points, strict=True):
            good = [v for v in values if math.isfinite(v)]
            ax.scatter([x] * len(good), good, s=16, alpha=0.6, color="C0", label="each seed")
            if good:
                ax.vlines(x, min(good), max(good), color="C0", alpha=0.4)
            if len(good) == len(values) and good:
                ax.scatter([x], [sum(good) / len(good)], marker="D", color="C1", label="mean")
            bad = len(values) - len(good)
            if bad:  # above the frame, in axes coordinates: infinity has no place on the axis
                ax.scatter(
                    [x] * bad,
                    [1.03] * bad,
                    marker="^",
                    color="red",
                    clip_on=False,
                    transform=ax.get_xaxis_transform(),
                    label="diverged (inf)",
                )
        if log_y:
            ax.set_yscale("log")
        ax.set(xlabel=key, ylabel=ylabel if ax is axes[0][0] else None)
        ax.grid(alpha=0.3)
    handles = dict(zip(*reversed(axes[0][0].get_legend_handles_labels()), strict=True))
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=7)
    return _save(fig, path, description=f"objective against: {', '.join(panels)}")
