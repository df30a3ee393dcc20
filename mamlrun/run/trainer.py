"""The meta-training loop of one run: set-up, steps, logging, validation and checkpoints.

One iteration: draw a meta-batch of tasks, let the engine adapt to each task and accumulate the
meta-gradient of the query loss, clip it if asked, take an outer optimizer step (`MetaStep`).
Around that: logging every `train.log_every` iterations, validation on a fixed set of held-out
tasks every `train.val_every`, `checkpoints/last.pt` every `train.checkpoint_every` and
`checkpoints/best.pt` whenever validation improves. SIGINT, SIGTERM or SIGUSR2 end the loop after
the iteration it is in, with `last.pt` written for that iteration (`mamlrun.run.interrupt`). A
checkpoint carries every RNG state and the sampler state, so `resume=` continues exactly where the
run stopped (identical parameters and metrics on the CPU).

A step with a non-finite meta-loss or meta-gradient is never applied (`MetaStep`); with
`train.on_nonfinite=stop` the run ends with a `UserError` naming that iteration and the last good
checkpoint, with `skip` it goes on and each logged train row counts the window's `skipped_steps`.
The flag is read every iteration on a CPU (free there), else before each log, validation and
checkpoint, so nothing non-finite is ever written.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mamlrun import console
from mamlrun.config.schema import RunConfig
from mamlrun.config.validate import captures_cuda_graph
from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.engine import Engine
from mamlrun.maml.step import MetaStep, read_stats
from mamlrun.run import distributed, rundir
from mamlrun.run.build import (
    VALIDATION_SEED_OFFSET,
    engine_for,
    meta_optimizer,
    model_for,
    preprocessing_for,
    task_sampler,
)
from mamlrun.run.distributed import World
from mamlrun.run.interrupt import StopRequests
from mamlrun.run.pruning import Pruned, TrialReporter
from mamlrun.run.runtime import seed_everything, select_device
from mamlrun.run.tracking import (
    MetricsFile,
    NullTracker,
    UnwrittenMetrics,
    make_tracker,
    prefixed,
    read_metrics,
)


class Trainer:
    """Meta-trains the model of `config` in `run_dir`, from scratch or from a checkpoint's
    `payload` (resume).

    Args:
        config: the validated run config.
        run_dir: where the run's files go (`mamlrun.run.rundir`).
        record: the resolved config as plain data: saved in checkpoints and sent to the tracker.
        payload: a loaded `last.pt` to continue from, or None.
        world: the processes training this run together (`mamlrun.run.distributed`): each
            computes the meta-gradient of its share of every meta-batch; rank 0 alone writes
            metrics, checkpoints, plots and the tracker's run.

    Example:
        >>> trainer = Trainer(config, run_dir, record)
        >>> trainer.fit()
        >>> trainer.evaluate()
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        record: dict[str, Any],
        payload: dict[str, Any] | None = None,
        world: World | None = None,
    ) -> None:
        self.config, self.run_dir, self.record = config, run_dir, record
        self.world = world = World() if world is None else world
        self.device = select_device(config.hardware)
        seed_everything(config.seed)
        if config.print_config and world.is_main:
            console.print_config_tree(record, title=f"mamlrun train → {run_dir}")
        self._build()
        self.start, self.best, self.window = 0, None, []
        self.skipped = 0  # steps skipped as non-finite, up to the last logged iteration
        self._state_checked_at = 0  # the last iteration after which the state was finite
        self.last_good: tuple[Path, int] | None = None  # the last last.pt written, its iteration
        if payload is not None:
            self._restore(payload)
        distributed.broadcast_parameters(self.model, world)  # the same start on every rank
        algorithm, hardware = config.algorithm, config.hardware
        self.reduce = None
        if world.distributed:
            self.reduce = distributed.MetaGradientSum(
                self.model.parameters(), world, algorithm.meta_batch_size
            )
        # after loading the optimizer's state: the step may switch on its `capturable` option
        self.meta_step = MetaStep(
            self.engine,
            self.optimizer,
            algorithm.grad_clip,
            cuda_graph=captures_cuda_graph(hardware, algorithm),
            bf16=hardware.precision == "bf16",
            skip_nonfinite=config.train.on_nonfinite == "skip",
            reduce=self.reduce,
        )
        # a fresh run starts the file anew: rows of an attempt killed before its first checkpoint
        # would otherwise stay in front of this run's (resume keeps those up to its checkpoint)
        self.metrics = (
            MetricsFile(run_dir, keep_until=self.start) if world.is_main else UnwrittenMetrics()
        )
        resume_id = (payload or {}).get("wandb_id")
        self.tracker = (
            make_tracker(config.logger, run_dir, record, resume_id=resume_id)
            if world.is_main
            else NullTracker()
        )
        self.seconds = 0.0
        self.trial = TrialReporter.from_environment()  # a trial of `mamlrun tune`, else None
        self.pruned_at: int | None = None

    def _build(self) -> None:
        """Model, engine, outer optimizer, the training sampler and the fixed validation tasks
        (in this order: the model's initialization draws from the seeded global RNG)."""
        config, device = self.config, self.device
        dataset, algorithm = config.dataset, config.algorithm
        self.model = model_for(config.model, dataset).to(device)
        self.engine = engine_for(self.model, algorithm, dataset, config.hardware)
        self.optimizer = meta_optimizer(self.model, algorithm)
        preprocessing = preprocessing_for(dataset)  # for `mamlrun adapt`: inputs as in training
        self.preprocessing = preprocessing and preprocessing.to_dict()
        params = sum(p.numel() for p in self.model.parameters())
        if self.world.is_main:
            console.info(f"model <{config.model.name}> with {params:,} parameters on {device}")
        self.train_tasks = task_sampler(dataset, "train", seed=config.seed, device=device)
        val_seed = config.eval.seed + VALIDATION_SEED_OFFSET
        val_sampler = task_sampler(dataset, "val", seed=val_seed)
        self.val_batch = val_sampler.sample(config.train.val_tasks).to(device)

    def _restore(self, payload: dict[str, Any]) -> None:
        rundir.load_weights(self.model, payload, self.run_dir)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.train_tasks.load_state_dict(payload["sampler"])
        rundir.set_rng_state(payload["rng"])
        self.start, self.best, self.window = (
            payload["iteration"],
            payload["best"],
            payload["window"],
        )
        self.skipped = payload.get("skipped_steps", 0)
        self._state_checked_at = self.start
        self.last_good = (rundir.checkpoint_path(self.run_dir, rundir.LAST), self.start)
        size = payload.get("world_size", 1)
        if self.world.is_main:
            changed = f" (trained by {size} processes, now {self.world.size})"
            console.info(
                f"resuming {self.run_dir} from iteration {self.start}"
                + (changed if size != self.world.size else "")
            )

    @property
    def metric(self) -> str:
        return self.engine.metric_name

    def fit(self) -> None:
        """Train from the start iteration to `train.iterations`, with a progress bar."""
        loop, started = self.config.train, time.perf_counter()
        stops, every_step = loop.on_nonfinite == "stop", self.device.type == "cpu"
        bar = console.progress(shown=self.world.is_main)
        with bar, StopRequests() as stop:
            task = bar.add_task(
                "train", total=loop.iterations, completed=self.start, speed="", losses=""
            )
            for iteration in range(self.start + 1, loop.iterations + 1):
                last = iteration == loop.iterations
                logged = iteration % loop.log_every == 0 or last
                validated = iteration % loop.val_every == 0 or last
                saved = iteration % loop.checkpoint_every == 0 or last
                stopping = self._step(logged, stop)
                writes = logged or validated or saved
                if stops and (every_step or writes):
                    # before anything is written; on a CPU only the new step is unread
                    window = self.window[-1:] if every_step else None
                    self._stop_if_nonfinite(iteration, window, check_state=writes)
                if logged:
                    self._log(iteration, started, bar, task)
                if validated:
                    self._validate(iteration)
                if saved or stopping or self.pruned_at is not None:
                    self._checkpoint(rundir.LAST, iteration)
                bar.update(task, completed=iteration)
                if self.pruned_at is not None:
                    self.seconds = time.perf_counter() - started
                    raise Pruned(iteration)
                if stopping:
                    self.seconds = time.perf_counter() - started
                    raise stop.interrupted(iteration, str(self.last_good[0]), str(self.run_dir))
        self.seconds = time.perf_counter() - started

    def _step(self, logged: bool, stop: StopRequests) -> bool:
        """One meta-iteration. The pre-adaptation query loss costs an extra forward pass:
        measured only on the last meta-batch of each logging window (the post-adaptation one on
        all). Statistics stay on the device until logged: no wait for the GPU per iteration.

        Every rank draws the whole meta-batch and keeps its share (`World.slice`). Returns
        whether the run stops after this iteration: it was signalled (`stop`); with several
        ranks, a signal goes to all of them with the meta-gradient and they stop after the same
        step (one signalled during this step stops after the next)."""
        algorithm = self.config.algorithm
        if stop.signum is not None and self.reduce is not None:
            self.reduce.request_stop()
        batch = self.train_tasks.sample(algorithm.meta_batch_size)
        batch = self.world.slice(batch).to(self.device)
        self.window.append(self.meta_step(batch, algorithm.inner_steps, measure_before=logged))
        if self.reduce is None:
            return stop.signum is not None
        if not self.reduce.agreed_stop():
            return False
        stop.signum = stop.signum or signal.SIGTERM  # another rank was signalled
        return True

    def _stop_if_nonfinite(
        self, iteration: int, window: list | None = None, check_state: bool = False
    ) -> None:
        """Raise if a step of `window` (the logging window so far, which ends at `iteration`)
        had a non-finite meta-loss or, with `check_state` (before a write), if the parameters or
        the optimizer's state are no longer finite; reading the flags waits for those steps.

        Raises:
            UserError: `train.on_nonfinite=stop` and a non-finite step.
        """
        window = self.window if window is None else window
        flags = [float(stats.get("nonfinite", 0.0)) for stats in window]
        if any(flags):
            first = iteration - len(window) + 1 + next(i for i, f in enumerate(flags) if f)
            when = f"at iteration {first}"
        elif check_state and not self.meta_step.state_is_finite():
            since = self._state_checked_at + 1  # the state was finite after the step before
            when = f"at iteration {iteration}"
            if since < iteration:
                when = f"between iterations {since} and {iteration}"
        else:
            if check_state:
                self._state_checked_at = iteration
            return
        good = "no checkpoint was written before it"
        if self.last_good is not None:
            path, good_iteration = self.last_good
            good = f"the last good checkpoint is {path} (iteration {good_iteration})"
        raise UserError(
            f"train.on_nonfinite=stop: non-finite meta-loss or meta-gradient {when}; "
            f"{good}; lower algorithm.inner_lr / meta_lr, set algorithm.grad_clip, or "
            "train.on_nonfinite=skip"
        )

    def _log(self, iteration: int, started: float, bar, task) -> None:
        """The logging window's mean statistics and its count of skipped (non-finite) steps: to
        metrics.jsonl, the tracker and the bar."""
        window = read_stats(self.window)
        skipped = sum(int(stats.pop("nonfinite", 0.0)) for stats in window)
        means = {**_window_means(window, self.metric), "skipped_steps": skipped}
        self.window, self.skipped = [], self.skipped + skipped
        if self.device.type == "cuda":
            means["gpu_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.world.distributed:
            state = {"sampler": self.train_tasks.state_dict(), "rng": rundir.rng_state()}
            distributed.check_in_sync(self.model, self.world, iteration, state)
        row = self.metrics.write(iteration, "train", means)
        self.tracker.log(prefixed("train", row), iteration)
        rate = (iteration - self.start) / (time.perf_counter() - started)
        losses = f"loss {means['loss_pre']:.4f} → {means['loss_post']:.4f}"
        bar.update(task, speed=f"{rate:.1f} it/s", losses=losses)
        if not console.console.is_terminal and self.world.is_main:  # logs, pipes: a plain line
            total = self.config.train.iterations
            console.info(f"iteration {iteration}/{total} {rate:.1f} it/s {losses}")

    def _validate(self, iteration: int) -> None:
        """Validation on the fixed held-out tasks; a better score writes `best.pt`. In a trial
        of `mamlrun tune` the score goes to the trial, whose pruner may stop the run here."""
        steps = self.config.algorithm.test_inner_steps
        val = validation_metrics(self.engine, self.val_batch, steps, self.world)
        self.tracker.log(prefixed("val", self.metrics.write(iteration, "val", val)), iteration)
        score = val[f"{self.metric}_step{steps}"]
        sign = 1.0 if self.engine.higher_is_better else -1.0
        if self.best is None or sign * score > sign * self.best["value"]:
            self.best = {"value": score, "iteration": iteration}
            self._checkpoint(rundir.BEST, iteration)
        final = iteration == self.config.train.iterations
        if self.trial is not None and self.trial.report(score, iteration, final):
            self.pruned_at = iteration

    def _checkpoint(self, name: str, iteration: int) -> None:
        """Write checkpoints/<name>. Every value is data (tensors, numbers, strings, None and
        containers of them; the samplers' and NumPy's RNG states included) so that it loads with
        `torch.load(weights_only=True)`: `rundir.save` checks it and writes atomically."""
        path = rundir.checkpoint_path(self.run_dir, name)
        if self.world.is_main:
            self._save(path, iteration)
        if name == rundir.LAST:
            self.last_good = (path, iteration)

    def _save(self, path: Path, iteration: int) -> None:
        rundir.save(
            path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.train_tasks.state_dict(),
                "rng": rundir.rng_state(),
                "iteration": iteration,
                "best": self.best,
                "window": read_stats(self.window),
                "config": self.record,
                "preprocessing": self.preprocessing,
                "metric": self.metric,
                "wandb_id": self.tracker.run_id,
                "skipped_steps": self.skipped,
                # every rank's sampler and RNG state is the one above: they draw alike
                "world_size": self.world.size,
            },
        )

    def summarize(self) -> None:
        """The learning-curve plot and the training summary table (rank 0's)."""
        if not self.world.is_main:
            return
        loop = self.config.train
        path = self.run_dir / rundir.METRICS
        # train.iterations=0 trains nothing and logs nothing: the test evaluates the initialization
        rows = read_metrics(path) if path.exists() else []
        if rows:
            from mamlrun.run import plots  # matplotlib once there is a plot to draw

            curves = plots.learning_curves(rows, self.metric, self.run_dir / rundir.LEARNING_CURVES)
            self.tracker.log_images([curves], step=loop.iterations)
        done = loop.iterations - self.start
        summary = [
            ["iterations", f"{loop.iterations:,} ({done:,} this session)"],
            ["wall time", f"{self.seconds:.1f} s ({done / max(self.seconds, 1e-9):.1f} it/s)"],
        ]
        if self.best is not None:
            best = f"{self.best['value']:.4f} (iteration {self.best['iteration']})"
            summary.append([f"best val {self.metric}", best])
        train_rows = [r for r in rows if r["split"] == "train"]
        if train_rows:
            losses = f"{train_rows[-1]['loss_pre']:.4f} → {train_rows[-1]['loss_post']:.4f}"
            summary.append(["final train loss", losses])
        if loop.on_nonfinite == "skip":
            summary.append(["skipped steps (non-finite)", f"{self.skipped:,}"])
        console.print_table(f"Training summary: {self.run_dir}", ["", "value"], summary)

    def evaluate(self) -> None:
        """The test protocol on `best.pt` (the initialization where no validation ran)."""
        from mamlrun.run.evaluation import evaluate_and_report

        best_path = rundir.checkpoint_path(self.run_dir, rundir.BEST)
        self.world.barrier()  # rank 0 has written best.pt
        if best_path.exists():
            self.model.load_state_dict(rundir.load(best_path)["model"])
        best_iteration = (self.best or {}).get("iteration", 0)
        evaluate_and_report(
            self.engine,
            self.config,
            self.device,
            self.run_dir,
            self.tracker,
            best_path,
            best_iteration,
            self.config.train.iterations,
            self.world,
        )


def _window_means(window: list[dict[str, float]], metric: str) -> dict[str, float]:
    """Mean of each statistic over a logging window, named with the task type's metric; the
    mean of its finite values (skipped steps' values are not; NaN where none is finite)."""
    means = {key: _finite_mean(s[key] for s in window if key in s) for key in window[-1]}
    if metric == "mse":  # the metric is the loss: do not log it twice
        means = {k: v for k, v in means.items() if not k.startswith("metric")}
    return {k.replace("metric", metric): v for k, v in means.items()}


def _finite_mean(values) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return statistics.fmean(finite) if finite else math.nan


def validation_metrics(
    engine: Engine, val_batch: TaskBatch, steps: int, world: World | None = None
) -> dict[str, float]:
    """Mean query metric (and loss, for classification) after 0..steps steps on the fixed
    validation tasks, split across the ranks of `world`. Engines bound their own memory (the
    vmap engine adapts in chunks)."""
    result: dict[str, float] = {}
    world = World() if world is None else world

    def curve(batch: TaskBatch) -> dict[str, torch.Tensor]:
        return engine.adaptation_curve(batch, steps)

    curves = distributed.gather_curves(world, curve, val_batch)
    for key, values in curves.items():
        if key == "loss" and engine.metric_name == "mse":
            continue  # for regression the metric is the loss
        mean = values.double().mean(dim=0)
        result.update({f"{key}_step{s}": float(v) for s, v in enumerate(mean)})
    return result
