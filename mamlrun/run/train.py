"""`mamlrun train`: meta-train, validate, checkpoint, then evaluate the best checkpoint.

One iteration: draw a meta-batch of tasks, let the engine adapt to each task and accumulate the
meta-gradient of the query loss, clip it if asked, take an outer optimizer step. Around that:
logging every `train.log_every` iterations, validation on a fixed set of held-out tasks every
`train.val_every`, `checkpoints/last.pt` every `train.checkpoint_every` and `checkpoints/best.pt`
whenever validation improves. A checkpoint carries every RNG state and the sampler state, so
`resume=` continues exactly where the run stopped (identical parameters and metrics on the CPU).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mamlrun import console
from mamlrun.config.compose import to_container
from mamlrun.config.validate import captures_cuda_graph, validate
from mamlrun.errors import ConfigError
from mamlrun.maml.step import MetaStep, read_stats
from mamlrun.run.build import (
    VALIDATION_SEED_OFFSET,
    engine_for,
    meta_optimizer,
    model_for,
    task_sampler,
)
from mamlrun.run.evaluation import evaluate_and_report
from mamlrun.run.plots import learning_curves
from mamlrun.run.rundir import (
    CHECKPOINT_DIR,
    load,
    resolve,
    rng_state,
    run_dir_of,
    save,
    set_rng_state,
)
from mamlrun.run.runtime import seed_everything, select_device
from mamlrun.run.tracking import (
    MetricsFile,
    NullTracker,
    Tracker,
    WandbTracker,
    prefixed,
    read_metrics,
)

# Keys a resumed run takes from the command line; everything else comes from the checkpoint.
RESUMABLE_SECTIONS = ("train", "eval", "hardware", "logger", "print_config", "resume", "task_name")


def make_tracker(
    typed: dict[str, Any], run_dir: Path, config: dict[str, Any], resume_id: str | None = None
) -> Tracker:
    """The experiment tracker chosen by `logger=`; run name and group derive from the experiment."""
    logger = typed["logger"]
    if logger.name == "none":
        return NullTracker()
    dataset, algorithm = typed["dataset"].name, typed["algorithm"].name
    group = logger.group or f"{dataset}-{algorithm}"
    name = logger.run_name or f"{group}-seed{config.get('seed', 0)}"
    job = HydraConfig.get().job.get("num") if HydraConfig.initialized() else None
    if job is not None and HydraConfig.get().mode.name == "MULTIRUN":
        name = f"{name}-job{job}"
    return WandbTracker(
        run_dir,
        config,
        logger.mode,
        logger.project,
        name,
        group,
        logger.entity,
        logger.tags,
        resume_id=resume_id,
    )


def _resumed_config(cfg: DictConfig, checkpoint_config: dict[str, Any]) -> DictConfig:
    """The checkpoint's config, updated only by what this command line overrides explicitly.

    Run control (`train.*`, `eval.*`, `hardware`, `logger`, `print_config`) may change on resume,
    for example `train.iterations` to train longer.

    Raises:
        ConfigError: when the command line overrides what defines the run (dataset, model,
            algorithm, seed): that is a new run, not a continuation.
    """
    merged = OmegaConf.create(checkpoint_config)
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in overrides:
        path = override.lstrip("+~").split("=", 1)[0]
        section = path.split(".", 1)[0]
        if section.startswith("hydra"):
            continue
        if section not in RESUMABLE_SECTIONS:
            raise ConfigError(
                f"{override}: resume= continues a run with its own {section}; drop this override "
                "or start a new run"
            )
        OmegaConf.update(merged, path, OmegaConf.select(cfg, path), merge=False)
    merged["resume"] = cfg["resume"]
    return merged


def _validation(engine, val_batch, steps: int) -> dict[str, float]:
    """Mean query metric (and loss, for classification) after 0..steps steps on the fixed
    validation tasks. Engines bound their own memory (the vmap engine adapts in chunks)."""
    result: dict[str, float] = {}
    for key, values in engine.adaptation_curve(val_batch, steps).items():
        if key == "loss" and engine.metric_name == "mse":
            continue  # for regression the metric is the loss
        mean = values.double().mean(dim=0)
        result.update({f"{key}_step{s}": float(v) for s, v in enumerate(mean)})
    return result


def run_train(cfg: DictConfig) -> float:
    """Train as configured; returns the best validation metric (for Hydra sweepers)."""
    typed = validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    payload: dict[str, Any] | None = None
    if typed["resume"]:
        resume_from = resolve(typed["resume"], prefer="last.pt")
        payload = load(resume_from)
        cfg = _resumed_config(cfg, payload["config"])
        typed = validate(cfg)
        run_dir = run_dir_of(resume_from)
    config = to_container(cfg)
    config.pop("hydra", None)
    dataset, algorithm, loop = typed["dataset"], typed["algorithm"], typed["train"]
    hardware = typed["hardware"]

    device = select_device(hardware)
    seed_everything(typed["seed"])
    if typed["print_config"]:
        console.print_config_tree(config, title=f"mamlrun train → {run_dir}")
    model = model_for(typed["model"], dataset).to(device)
    engine = engine_for(model, algorithm, dataset, hardware)
    optimizer = meta_optimizer(model, algorithm)
    params = sum(p.numel() for p in model.parameters())
    console.info(f"model <{typed['model'].name}> with {params:,} parameters on {device}")
    train_tasks = task_sampler(dataset, "train", seed=typed["seed"], device=device)
    val_seed = typed["eval"].seed + VALIDATION_SEED_OFFSET
    val_sampler = task_sampler(dataset, "val", seed=val_seed)
    val_batch = val_sampler.sample(loop.val_tasks).to(device)

    start, best, window = 0, None, []
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        train_tasks.load_state_dict(payload["sampler"])
        set_rng_state(payload["rng"])
        start, best, window = payload["iteration"], payload["best"], payload["window"]
        console.info(f"resuming {run_dir} from iteration {start}")
    # after loading the optimizer's state: the step may switch on its `capturable` option
    meta_step = MetaStep(
        engine,
        optimizer,
        algorithm.grad_clip,
        cuda_graph=captures_cuda_graph(hardware, algorithm),
        bf16=hardware.precision == "bf16",
    )
    metrics = MetricsFile(run_dir, keep_until=start if payload else None)
    tracker = make_tracker(typed, run_dir, config, resume_id=(payload or {}).get("wandb_id"))
    metric = engine.metric_name
    sign = 1.0 if engine.higher_is_better else -1.0

    def checkpoint(name: str, iteration: int) -> None:
        save(
            run_dir / CHECKPOINT_DIR / name,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": train_tasks.state_dict(),
                "rng": rng_state(),
                "iteration": iteration,
                "best": best,
                "window": read_stats(window),
                "config": config,
                "metric": metric,
                "wandb_id": getattr(tracker, "run_id", None),
            },
        )

    exit_code = 1
    started = time.perf_counter()
    try:
        bar = console.progress()
        with bar:
            task = bar.add_task(
                "train", total=loop.iterations, completed=start, speed="", losses=""
            )
            for iteration in range(start + 1, loop.iterations + 1):
                batch = train_tasks.sample(algorithm.meta_batch_size).to(device)
                last = iteration == loop.iterations
                logged = iteration % loop.log_every == 0 or last
                # The pre-adaptation query loss costs an extra forward pass: measured only on the
                # last meta-batch of each logging window (the post-adaptation one on all).
                # Statistics stay on the device until logged: no wait for the GPU per iteration.
                window.append(meta_step(batch, algorithm.inner_steps, measure_before=logged))
                if logged:
                    window = read_stats(window)
                    means = {
                        key: statistics.fmean(s[key] for s in window if key in s)
                        for key in window[-1]
                    }
                    if metric == "mse":  # the metric is the loss: do not log it twice
                        means = {k: v for k, v in means.items() if not k.startswith("metric")}
                    means = {k.replace("metric", metric): v for k, v in means.items()}
                    if device.type == "cuda":
                        means["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    tracker.log(
                        prefixed("train", metrics.write(iteration, "train", means)), iteration
                    )
                    window = []
                    rate = (iteration - start) / (time.perf_counter() - started)
                    losses = f"loss {means['loss_pre']:.4f} → {means['loss_post']:.4f}"
                    bar.update(task, speed=f"{rate:.1f} it/s", losses=losses)
                    if not console.console.is_terminal:  # logs and pipes get a plain line
                        console.info(
                            f"iteration {iteration}/{loop.iterations} {rate:.1f} it/s {losses}"
                        )
                if iteration % loop.val_every == 0 or last:
                    val = _validation(engine, val_batch, algorithm.test_inner_steps)
                    tracker.log(prefixed("val", metrics.write(iteration, "val", val)), iteration)
                    score = val[f"{metric}_step{algorithm.test_inner_steps}"]
                    if best is None or sign * score > sign * best["value"]:
                        best = {"value": score, "iteration": iteration}
                        checkpoint("best.pt", iteration)
                if iteration % loop.checkpoint_every == 0 or last:
                    checkpoint("last.pt", iteration)
                bar.update(task, completed=iteration)
        seconds = time.perf_counter() - started
        # train.iterations=0 trains nothing and logs nothing: the test evaluates the initialization
        rows = read_metrics(metrics.path) if metrics.path.exists() else []
        if rows:
            curves = learning_curves(rows, run_dir, metric)
            tracker.log_images([curves], step=loop.iterations)
        summary = [
            ["iterations", f"{loop.iterations:,} ({loop.iterations - start:,} this session)"],
            [
                "wall time",
                f"{seconds:.1f} s ({(loop.iterations - start) / max(seconds, 1e-9):.1f} it/s)",
            ],
        ]
        if best is not None:
            summary.append(
                [f"best val {metric}", f"{best['value']:.4f} (iteration {best['iteration']})"]
            )
        train_rows = [r for r in rows if r["split"] == "train"]
        if train_rows:
            summary.append(
                [
                    "final train loss",
                    f"{train_rows[-1]['loss_pre']:.4f} → {train_rows[-1]['loss_post']:.4f}",
                ]
            )
        console.print_table(f"Training summary: {run_dir}", ["", "value"], summary)
        if loop.eval_at_end:
            best_path = run_dir / CHECKPOINT_DIR / "best.pt"
            if best_path.exists():
                model.load_state_dict(load(best_path)["model"])
            best_iteration = (best or {}).get("iteration", 0)
            evaluate_and_report(
                engine, typed, device, run_dir, tracker, best_path, best_iteration, loop.iterations
            )
        exit_code = 0
        console.info(f"done: {run_dir}")
        return best["value"] if best else float("nan")
    except KeyboardInterrupt:
        console.info(f"interrupted; continue with: mamlrun train resume={run_dir}")
        raise
    finally:
        tracker.finish(exit_code)
