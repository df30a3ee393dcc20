"""Evaluation on held-out test tasks: per-step metric, mean and 95% CI, `eval.json`.

The protocol is the paper's: N test tasks (600 by default), each adapted from the meta-learned
initialization with up to S gradient steps of size alpha on its support set, and scored on its query
set after every step. The 95% confidence interval is 1.96 * std / sqrt(N), with the population std
(ddof=0) as in the authors' code. Test tasks depend only on `eval.seed`, never on the run seed, so
every run and every algorithm is scored on the same tasks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mamlrun import console
from mamlrun.config.schema import (
    Algorithm,
    EvalSettings,
    ImageDataset,
    RunConfig,
    SinusoidDataset,
)
from mamlrun.config.validate import validate
from mamlrun.data.atomic import write_atomically
from mamlrun.errors import UserError
from mamlrun.maml.engine import Engine
from mamlrun.run import distributed, jsonio, rundir
from mamlrun.run.build import (
    engine_for,
    eval_shots,
    load_trained,
    model_for,
    setting_label,
    task_sampler,
)
from mamlrun.run.distributed import World
from mamlrun.run.runtime import seed_everything, select_device
from mamlrun.run.tracking import Tracker, make_tracker

# Tasks adapted per call while evaluating; bounds memory for large models.
EVAL_CHUNK = 100


def summarize(values: torch.Tensor) -> dict[str, list[float]]:
    """Per-step statistics of a [tasks, steps + 1] tensor: mean, std, ci95, median, diverged.

    A task whose adaptation diverged (inf or nan) is kept: the mean becomes non-finite, as it
    honestly is, `diverged` counts such tasks per step, and the median treats them as the worst
    value (+inf) so it stays meaningful. Floats here; eval.json writes the non-finite ones as null
    (`jsonio.dumps`), and the tables read either.
    """
    values = values.double()
    std = values.std(dim=0, unbiased=False)
    finite = torch.isfinite(values)
    return {
        "mean": values.mean(dim=0).tolist(),
        "std": std.tolist(),
        "ci95": (1.96 * std / math.sqrt(values.shape[0])).tolist(),
        "median": values.nan_to_num(nan=math.inf, posinf=math.inf).median(dim=0).values.tolist(),
        "diverged": (~finite).sum(dim=0).tolist(),
    }


def adaptation_curves(
    engine: Engine,
    sampler: Any,
    tasks: int,
    steps: int,
    device: torch.device,
    world: World | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task loss and metric after 0..steps adaptation steps on `tasks` tasks from `sampler`.

    With several ranks every rank draws every chunk (the same tasks one process draws, chunk by
    chunk) and adapts its share of it; the rows are gathered in task order."""
    world = World() if world is None else world

    def curves(batch):
        return engine.adaptation_curve(batch.to(device), steps)

    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, tasks, EVAL_CHUNK):
        batch = sampler.sample(min(EVAL_CHUNK, tasks - start))
        parts.append(distributed.gather_curves(world, curves, batch))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def evaluate(
    engine: Engine,
    dataset: Any,
    algorithm: Algorithm,
    settings: EvalSettings,
    device: torch.device,
    world: World | None = None,
) -> dict[str, Any]:
    """Evaluate `engine.model` on `settings.tasks` test tasks per K, split across the ranks of
    `world`; returns eval.json's dict."""
    steps = algorithm.test_inner_steps if settings.inner_steps is None else settings.inner_steps
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for shots in eval_shots(dataset, settings.shots):
        sampler = task_sampler(dataset, "test", seed=settings.seed, shots=shots)
        curves = adaptation_curves(engine, sampler, settings.tasks, steps, device, world)
        results[setting_label(dataset, shots)] = {
            "shots": shots,
            engine.metric_name: summarize(curves[engine.metric_name]),
            "loss": summarize(curves["loss"]),
        }
    return {
        "metric": engine.metric_name,
        "higher_is_better": engine.higher_is_better,
        "tasks": settings.tasks,
        "inner_steps": steps,
        "inner_lr": algorithm.inner_lr,
        "eval_seed": settings.seed,
        "dataset": dataset.name,
        "algorithm": algorithm.name,
        "seconds": round(time.perf_counter() - started, 2),
        "results": results,
    }


def headline(report: dict[str, Any]) -> dict[str, float]:
    """Flat `test/K<k>/<metric>_step<s>` numbers (and their CI) for trackers and sweeps."""
    flat: dict[str, float] = {}
    metric = report["metric"]
    for label, result in report["results"].items():
        key = label.replace("=", "").replace(" ", "_")
        for step, (mean, ci) in enumerate(
            zip(result[metric]["mean"], result[metric]["ci95"], strict=True)
        ):
            flat[f"test/{key}/{metric}_step{step}"] = mean
            flat[f"test/{key}/{metric}_step{step}_ci95"] = ci
    return flat


def report_steps(inner_steps: int) -> list[int]:
    """The steps shown in tables: 0, 1, 5, 10 and the last, where they exist."""
    return sorted({s for s in (0, 1, 5, 10, inner_steps) if s <= inner_steps})


# Beyond this magnitude a table shows a number in scientific notation, not 20 digits.
SCIENTIFIC_FROM = 1e6


def number_text(value: float | None, digits: int) -> str:
    """A number in a table: `digits` decimals, or `:.3e` from SCIENTIFIC_FROM on. None (eval.json's
    null for a non-finite mean or median) is `inf`: diverged tasks count as +inf, as in the median.
    """
    if value is None:
        return "inf"
    if math.isfinite(value) and abs(value) >= SCIENTIFIC_FROM:
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def mean_cell(stats: dict[str, list], step: int, scale: float, digits: int, unit: str = "") -> str:
    """`mean ± 95% CI` at `step` of eval.json-style `stats`; where tasks diverged, their count and
    the median: `inf (3 diverged, median 5.770)` (the mean, non-finite or null, has no CI)."""
    stats = jsonio.finite_or_none(stats)  # the same cell from memory (floats) and from eval.json
    mean, ci = stats["mean"][step], stats["ci95"][step]
    if mean is None:
        cell = "inf" + unit
    else:
        ci_text = "inf" if ci is None else number_text(scale * ci, digits)
        cell = f"{number_text(scale * mean, digits)} ± {ci_text}{unit}"
    diverged = stats.get("diverged", [0] * (step + 1))[step]
    if diverged:
        cell += f" ({diverged} diverged, median {number_text(stats['median'][step], 3)})"
    return cell


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Rows of mean ± 95% CI per setting; accuracy in percent, as the paper's tables."""
    metric, steps = report["metric"], report_steps(report["inner_steps"])
    percent = metric == "acc"
    name = "acc %" if percent else metric
    columns = ["setting"] + [f"{name} after {s} step{'s' * (s != 1)}" for s in steps]
    scale, digits = (100, 2) if percent else (1, 3)
    rows = []
    for label, result in report["results"].items():
        rows.append([label, *(mean_cell(result[metric], s, scale, digits) for s in steps)])
    return columns, rows


# Sinusoid tasks drawn for the fit plot (paper Figure 2): per K, predictions after these steps.
FIT_SHOTS, FIT_STEPS = (5, 10), (0, 1, 10)


def sinusoid_fits(engine: Engine, dataset: SinusoidDataset, seed: int, count: int, device):
    """What the fit plot shows: `count` test tasks per K in FIT_SHOTS, their curves and support
    points, and the adapted model's predictions on a grid after each of FIT_STEPS."""
    from mamlrun.run.plots import SinusoidFit

    grid = torch.linspace(*dataset.x_range, 200, device=device).view(-1, 1)
    fits = []
    for shots in FIT_SHOTS:
        batch = task_sampler(dataset, "test", seed=seed, shots=shots).sample(count)
        for task in range(count):
            support_x, support_y = (t[task].to(device) for t in (batch.support_x, batch.support_y))
            truth = batch.amplitude[task] * torch.sin(grid.cpu() - batch.phase[task])
            outputs = engine.predictions(support_x, support_y, grid, list(FIT_STEPS))
            predictions = {step: output.cpu() for step, output in outputs.items()}
            fits.append(
                SinusoidFit(shots, grid.cpu(), truth, support_x.cpu(), support_y.cpu(), predictions)
            )
    return fits


def _plots(
    report: dict[str, Any], config: RunConfig, engine: Engine, run_dir: Path, device
) -> list[Path]:
    from mamlrun.run import plots  # matplotlib once there is a plot to draw

    paths = [plots.adaptation_plot(report, run_dir / rundir.ADAPTATION)]
    settings = config.eval
    if isinstance(config.dataset, SinusoidDataset) and settings.plot_tasks > 0:
        fits = sinusoid_fits(engine, config.dataset, settings.seed, settings.plot_tasks, device)
        paths.append(
            plots.sinusoid_fits(fits, config.dataset.x_range, run_dir / rundir.SINUSOID_FITS)
        )
    return paths


def evaluate_and_report(
    engine: Engine,
    config: RunConfig,
    device: torch.device,
    run_dir: Path,
    tracker: Tracker,
    checkpoint: Path,
    iteration: int,
    step: int,
    world: World | None = None,
) -> dict[str, Any]:
    """Evaluate with `config.eval` on `config.dataset`'s test tasks, then write eval.json and the
    plots, print the table and send both to the tracker at `step`. Shared by `mamlrun eval` and
    the end of training. With several ranks all evaluate their share; rank 0 alone reports."""
    world = World() if world is None else world
    report = evaluate(engine, config.dataset, config.algorithm, config.eval, device, world)
    report.update(checkpoint=str(checkpoint), iteration=iteration)
    if not world.is_main:
        return report
    text = jsonio.dumps(report, indent=2) + "\n"  # all or nothing: a full disk keeps the old
    write_atomically(run_dir / rundir.EVAL, lambda file: file.write(text.encode()))
    columns, rows = table_rows(report)
    title = (
        f"Test: {report['tasks']} tasks, mean ± 95% CI ({report['dataset']}, {report['algorithm']})"
    )
    console.print_table(title, columns, rows)
    tracker.log(headline(report), step=step)
    tracker.log_table("test/table", columns, rows, step=step)
    tracker.log_images(_plots(report, config, engine, run_dir, device), step=step)
    return report


def run_eval(cfg: DictConfig) -> dict[str, float]:
    """`mamlrun eval checkpoint=<run dir or .pt>`: evaluate a trained model, write eval.json."""
    settings = validate(cfg, primary="eval")
    checkpoint_path, payload, trained = load_trained(
        settings.checkpoint, settings.trust_model_target
    )
    # The model's config comes from the checkpoint; how to run and score it, from this command.
    config = dataclasses.replace(
        trained, hardware=settings.hardware, logger=settings.logger, eval=settings.eval
    )
    if settings.data_root is not None:  # the data is elsewhere on this machine
        if not isinstance(config.dataset, ImageDataset):
            raise UserError(f"data_root: the {config.dataset.name} dataset reads no files")
        dataset = dataclasses.replace(config.dataset, root=settings.data_root)
        config = dataclasses.replace(config, dataset=dataset)
    device = select_device(settings.hardware)
    seed_everything(settings.seed)
    model = model_for(config.model, config.dataset).to(device)
    rundir.load_weights(model, payload, checkpoint_path)
    engine = engine_for(model, config.algorithm, config.dataset, config.hardware)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    console.info(f"Evaluating {checkpoint_path} (iteration {payload['iteration']}) → {run_dir}")
    record = payload["config"] | {"checkpoint": str(checkpoint_path)}
    tracker = make_tracker(settings.logger, run_dir, record)
    try:
        iteration = payload["iteration"]
        report = evaluate_and_report(
            engine, config, device, run_dir, tracker, checkpoint_path, iteration, step=iteration
        )
    finally:
        tracker.finish()
    return headline(report)
