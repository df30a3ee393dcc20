"""`Engine`: what the rest of mamlrun may ask of a MAML engine, and nothing more.

Three classes implement it: `Learn2LearnEngine` (the reference, task by task through learn2learn),
`VmapEngine` (all tasks of a meta-batch in one batched call) and `PretrainEngine` (the supervised
baseline, which trains differently and adapts through one of the other two). The trainer
(`mamlrun.run.trainer`), evaluation and its plots (`mamlrun.run.evaluation`, `mamlrun.run.plots`),
`MetaStep` (`mamlrun.maml.step`), `PretrainEngine` and the benchmark (`mamlrun.analysis.bench`)
use engines only through these members, so a new engine is complete when it has them all, and a
difference between engines is a member here (`capturable`, `task_mean`), never a check for whether
an engine happens to have some attribute. tests/test_engine_protocol.py checks every engine.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.objectives import LossFn

# Statistics of one meta-gradient: name -> 0-dim tensor on the training device, or a float for
# engines that read their values on the host anyway. `float()` reads a value; reading a tensor
# waits for the step that computed it.
StepStats = dict[str, "torch.Tensor | float"]


@runtime_checkable
class Engine(Protocol):
    """A MAML engine: meta-gradients for training, adaptation for validation and test.

    Attributes:
        model: the network whose parameters are the meta-parameters (the initialization MAML
            learns). The outer optimizer, gradient clipping and checkpoints work on it.
        task_type: "regression" or "classification" (a key of `TASK_TYPES`); it fixes the four
            members below.
        loss_fn: the loss adapted on the support set and meta-optimized on the query set, a mean
            over a task's examples (MSE or cross-entropy).
        metric_fn: the reported metric, a mean over a task's examples (MSE or accuracy).
        metric_name: the metric's name in logs, eval.json and plots ("mse" or "acc").
        higher_is_better: whether a larger metric is better; picks the best checkpoint.
        capturable: whether `meta_gradient` can run inside a CUDA graph: it launches the same
            kernels every call and never reads a value on the host. `MetaStep` refuses
            `cuda_graph=True` for an engine where this is False.
    """

    model: nn.Module
    task_type: str
    loss_fn: LossFn
    metric_fn: LossFn
    metric_name: str
    higher_is_better: bool
    capturable: bool

    def meta_gradient(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> StepStats:
        """Accumulate into the meta-parameters' `.grad` the meta-gradient of the batch's mean
        query loss after `inner_steps` adaptation steps; what `MetaStep` calls every iteration.

        Returns `loss_post` and `metric_post` (after adaptation) and, when `measure_before`, also
        `loss_pre` and `metric_pre` (before; an extra forward pass, so training asks for it only
        on logged iterations; an engine for which they cost nothing may always return them), each
        averaged over tasks. Values may stay 0-dim tensors on the device so that the caller need
        not wait for the step to finish.
        """
        ...

    def meta_backward(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """`meta_gradient` with its statistics read as floats: for callers that use the numbers
        at once (tests, scripts) rather than a training loop that should not wait."""
        ...

    def task_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the unadapted meta-parameters on each task's examples, x [tasks, examples,
        ...] -> [tasks, examples, ...], every task forward on its own (so batch norm normalizes
        per task, as during adaptation), with a graph to the meta-parameters. The pretrained
        baseline trains on these."""
        ...

    def task_mean(self, fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over tasks of `fn` (a loss or metric of `TASK_TYPES`, itself a mean over a
        task's examples) on [tasks, examples, ...] outputs and targets.

        Engines reduce as their own meta-gradients do: one call over all examples (the same mean,
        as all tasks of a batch have as many examples) or task by task. The two differ in float
        rounding only; each engine keeps its own so that a run's numbers do not depend on which
        code path asked."""
        ...

    def adaptation_curve(self, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        """Query loss and metric of every task after 0, 1, ..., steps adaptation steps on its
        support set: {"loss": [tasks, steps + 1], metric_name: [tasks, steps + 1]}, on the CPU.

        What validation and test evaluation report; the meta-parameters are not modified and no
        graph is kept (test-time adaptation)."""
        ...

    def predictions(
        self, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor, steps: list[int]
    ) -> dict[int, torch.Tensor]:
        """Outputs on `x` of the model adapted to one task's support set (support_x [K, ...],
        support_y [K, ...]), for each step count in `steps`: {step: outputs}. For plots of a
        regression fit (Finn et al.'s Figure 2)."""
        ...
