"""The meta-learning engine: adapt a model to tasks, compute (first-order) MAML meta-gradients.

`Learn2LearnEngine` is the reference implementation, written the way learn2learn's own MAML
examples are: for each task of the meta-batch, `clone()` the meta-learner, `adapt()` on the support
set, score the adapted clone on the query set and backpropagate. `import_learn2learn` is the one
place mamlrun imports learn2learn (on first use; the sampler, bench and downloader call it too).

References:
    Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    ICML 2017. Arnold et al., "learn2learn: A Library for Meta-Learning Research", 2020.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.objectives import TASK_TYPES, LossFn


def import_learn2learn():
    """learn2learn, imported on first use rather than with mamlrun.

    Its import is slow (its package pulls in torchvision's models, cvxpy and its Lightning
    helpers), and a run of the default vmap engine with the tensor sampler never uses it, nor
    should every one-line error wait for it (tests/test_cli.py reads `-X importtime`). Its gym
    import prints a deprecation notice, kept off stderr.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn
    return learn2learn


class Learn2LearnEngine:
    """MAML via learn2learn: per-task clone / adapt / backward.

    Args:
        model: any `nn.Module`; its parameters are the meta-parameters.
        inner_lr: alpha, the step size of each adaptation step.
        first_order: drop the second-order terms of the meta-gradient (FOMAML).
        task_type: "regression" (MSE) or "classification" (cross-entropy, accuracy).

    Example:
        >>> engine = Learn2LearnEngine(model, inner_lr=0.01, first_order=False)
        >>> stats = engine.meta_backward(batch, inner_steps=1)  # gradients now in model.grad
        >>> optimizer.step()
    """

    # It reads every task's loss on the host (`.item()`) as it goes: no CUDA graph.
    capturable = False

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        first_order: bool = False,
        task_type: str = "regression",
    ) -> None:
        self.model = model
        self.maml = import_learn2learn().algorithms.MAML(
            model, lr=inner_lr, first_order=first_order
        )
        self.loss_fn, self.metric_name, self.metric_fn, self.higher_is_better = TASK_TYPES[
            task_type
        ]
        self.task_type = task_type

    def _adapt(self, support_x, support_y, steps: int, first_order: bool | None = None):
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(self.loss_fn(learner(support_x), support_y), first_order=first_order)
        return learner

    def meta_backward(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss over the batch into `.grad`.

        Each task is backpropagated as soon as its query loss is known (loss / tasks), so only
        one task's graph is alive at a time, as in learn2learn's examples.

        Args:
            measure_before: also measure the query loss before adaptation, which costs an extra
                forward pass per task; training asks for it only on the iterations it logs.

        Returns:
            query loss and metric of the batch after adaptation (`loss_post`, `metric_post`) and,
            if measured, before (`loss_pre`, `metric_pre`), averaged over tasks.
        """
        tasks = len(batch)
        keys = ("loss_post", "metric_post") + (("loss_pre", "metric_pre") if measure_before else ())
        totals = dict.fromkeys(keys, 0.0)
        for i in range(tasks):
            support_x, support_y, query_x, query_y = batch.task(i)
            if measure_before:
                with torch.no_grad():
                    logits_pre = self.model(query_x)
                    totals["loss_pre"] += self.loss_fn(logits_pre, query_y).item()
                    totals["metric_pre"] += self.metric_fn(logits_pre, query_y).item()
            learner = self._adapt(support_x, support_y, inner_steps)
            logits = learner(query_x)
            query_loss = self.loss_fn(logits, query_y)
            (query_loss / tasks).backward()
            totals["loss_post"] += query_loss.item()
            totals["metric_post"] += self.metric_fn(logits.detach(), query_y).item()
        return {key: value / tasks for key, value in totals.items()}

    def meta_gradient(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """`meta_backward`: this engine reads its statistics on the host anyway, task by task,
        so they are floats here too."""
        return self.meta_backward(batch, inner_steps, measure_before)

    def task_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the meta-parameters on every task's examples x [tasks, examples, ...]: one
        forward per task (batch norm statistics per task), stacked; with graph."""
        return torch.stack([self.model(task_x) for task_x in x])

    def task_mean(self, fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over tasks of `fn` computed task by task, as this engine's other methods
        compute their losses."""
        return torch.stack([fn(out, y) for out, y in zip(outputs, targets, strict=True)]).mean()

    def adaptation_curve(self, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        """Query loss and metric after 0..steps adaptation steps, per task: [tasks, steps + 1]."""
        loss = torch.empty(len(batch), steps + 1)
        metric = torch.empty(len(batch), steps + 1)
        for i in range(len(batch)):
            support_x, support_y, query_x, query_y = batch.task(i)
            learner = self.maml.clone()
            for step in range(steps + 1):
                if step > 0:
                    # Values equal the second-order path; no graph is needed at test time.
                    learner.adapt(self.loss_fn(learner(support_x), support_y), first_order=True)
                with torch.no_grad():
                    logits = learner(query_x)
                    loss[i, step] = self.loss_fn(logits, query_y)
                    metric[i, step] = self.metric_fn(logits, query_y)
        return {"loss": loss, self.metric_name: metric}

    def predictions(
        self, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor, steps: list[int]
    ) -> dict[int, torch.Tensor]:
        """Outputs on `x` of the model adapted to one task's support set after each of `steps`."""
        outputs: dict[int, torch.Tensor] = {}
        learner = self.maml.clone()
        for step in range(max(steps) + 1):
            if step > 0:
                learner.adapt(self.loss_fn(learner(support_x), support_y), first_order=True)
            if step in steps:
                with torch.no_grad():
                    outputs[step] = learner(x)
        return outputs
