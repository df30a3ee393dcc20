"""PNG plots of a run: learning curves, the test metric over adaptation steps (paper Figure 3
style) and, for sinusoid, fits before and after adaptation (paper Figure 2 style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mamlrun.config.schema import SinusoidDataset
from mamlrun.run.build import task_sampler

FIT_STEPS = (0, 1, 10)  # predictions shown in the sinusoid fit plot
FIT_SHOTS = (5, 10)


def _save(fig: plt.Figure, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def learning_curves(rows: list[dict[str, Any]], run_dir: Path, metric: str) -> Path:
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
    return _save(fig, run_dir / "learning_curves.png")


def adaptation_plot(report: dict[str, Any], run_dir: Path) -> Path:
    """Test metric (mean ± 95% CI, and median) against adaptation steps, one line per setting."""
    curves = {label: result[report["metric"]] for label, result in report["results"].items()}
    title = f"{report['algorithm']}, test"
    return adaptation_comparison(curves, {}, report["metric"], title, run_dir / "adaptation.png")


def sinusoid_fits(
    engine: Any, dataset: SinusoidDataset, seed: int, count: int, run_dir: Path, device
) -> Path:
    """Ground truth, the K support points, and predictions after 0, 1 and 10 steps (Figure 2)."""
    grid = torch.linspace(*dataset.x_range, 200, device=device).view(-1, 1)
    fig, axes = plt.subplots(len(FIT_SHOTS), count, figsize=(4 * count, 3.2 * len(FIT_SHOTS)))
    axes = [[axes]] if count == 1 and len(FIT_SHOTS) == 1 else axes
    for row, shots in enumerate(FIT_SHOTS):
        batch = task_sampler(dataset, "test", seed=seed, shots=shots).sample(count)
        for col in range(count):
            ax = axes[row][col] if count > 1 else axes[row]
            support_x, support_y = (t[col].to(device) for t in (batch.support_x, batch.support_y))
            truth = batch.amplitude[col] * torch.sin(grid.cpu() - batch.phase[col])
            ax.plot(grid.cpu(), truth, color="red", label="ground truth")
            ax.scatter(
                support_x.cpu(),
                support_y.cpu(),
                marker="^",
                color="purple",
                zorder=3,
                label="used for grad",
            )
            outputs = engine.predictions(support_x, support_y, grid, list(FIT_STEPS))
            styles = {0: ":", 1: "--", 10: "-"}
            for step, prediction in outputs.items():
                name = "pre-update" if step == 0 else f"{step} grad step{'s' * (step > 1)}"
                ax.plot(grid.cpu(), prediction.cpu(), styles[step], color="green", label=name)
            ax.set_title(f"K={shots}, task {col + 1}")
            ax.set_xlim(*dataset.x_range)
    (axes[0][0] if count > 1 else axes[0]).legend(fontsize=7, loc="lower left")
    return _save(fig, run_dir / "sinusoid_fits.png", dpi=110)


def evaluation_plots(
    report: dict[str, Any], run_dir: Path, engine: Any, typed: dict[str, Any], device
) -> list[Path]:
    paths = [adaptation_plot(report, run_dir)]
    settings = typed["eval"]
    if isinstance(typed["dataset"], SinusoidDataset) and settings.plot_tasks > 0:
        paths.append(
            sinusoid_fits(
                engine, typed["dataset"], settings.seed, settings.plot_tasks, run_dir, device
            )
        )
    return paths


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
        mean, ci = torch.tensor(stats["mean"]), torch.tensor(stats["ci95"])
        steps = torch.arange(len(mean))
        (line,) = ax.plot(steps, mean, marker="o", label=f"{label} (mamlrun mean)")
        low = mean - ci if metric != "mse" else (mean - ci).clamp_min(float(mean.min()) / 4)
        ax.fill_between(steps, low, mean + ci, alpha=0.2, color=line.get_color())
        if "median" in stats:  # a few diverging tasks can dominate the mean: show both
            ax.plot(
                steps,
                stats["median"],
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
    if metric == "mse":
        ax.set_yscale("log")  # outlier tasks' spikes would flatten the rest (band cut at > 0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
