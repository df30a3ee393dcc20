"""The "pretrained" baseline of Finn et al. 2017 (Sec. 5.1, Figure 3, Appendix Table 2).

One network is trained by plain supervised learning on tasks drawn from the whole task
distribution, with no inner loop, then fine-tuned at test time exactly as MAML is. It answers the
question the paper asks of MAML: does meta-learning the initialization matter, or would any network
that has seen all the tasks adapt as well? To make the comparison fair it gets MAML's budget (same
iterations, same meta-batch of tasks, same Adam step size `algorithm.meta_lr`) and MAML's test-time
adaptation (same SGD steps of size `algorithm.inner_lr`, same code: `adaptation_curve` and
`predictions` are the wrapped MAML engine's own).

The paper fine-tunes the baseline "using an automatically tuned step size"; mamlrun uses the
configured `algorithm.inner_lr` (0.01, as MAML's), so its numbers answer "same adaptation as MAML".
Another step size is one override away: `algorithm.inner_lr=0.02`.
"""

from __future__ import annotations

import torch

from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.engine import Engine
from mamlrun.maml.objectives import LossFn


class PretrainEngine:
    """Supervised pretraining on all tasks jointly; test-time adaptation delegated to a MAML engine.

    Args:
        base: the engine MAML would use for this config (`VmapEngine` or `Learn2LearnEngine`).
            Its model holds the shared parameters; its adaptation code is used unchanged.

    Example:
        >>> engine = PretrainEngine(Learn2LearnEngine(model, inner_lr=0.01))
        >>> stats = engine.meta_backward(batch, inner_steps=0)  # gradients now in model.grad
        >>> optimizer.step()
    """

    # Its step reads the loss on the host (`meta_backward` returns floats): no CUDA graph.
    capturable = False

    def __init__(self, base: Engine) -> None:
        self.base = base
        self.model = base.model
        self.loss_fn, self.metric_fn = base.loss_fn, base.metric_fn
        self.metric_name, self.higher_is_better = base.metric_name, base.higher_is_better
        self.task_type = base.task_type

    def meta_backward(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """Accumulate the gradient of the mean supervised loss over the batch into `.grad`.

        Every point of a task (support and query) is a training example for the shared
        parameters. Each task gets its own forward (`task_outputs`: one batched call for all tasks
        when the base is the vmap engine), so a model with batch norm normalizes per task as under
        MAML, and the mean over tasks is the base's own (`task_mean`).

        Args:
            batch: the meta-batch of tasks (MAML's training tasks).
            inner_steps: ignored; the baseline never adapts during training.
            measure_before: ignored; before and after are the same numbers here.

        Returns:
            the same keys as MAML's engines; before and after are equal (there is no
            adaptation): the supervised loss and metric averaged over tasks.
        """
        del inner_steps, measure_before
        inputs = torch.cat([batch.support_x, batch.query_x], dim=1)
        targets = torch.cat([batch.support_y, batch.query_y], dim=1)
        outputs = self.base.task_outputs(inputs)
        loss = self.base.task_mean(self.loss_fn, outputs, targets)
        metric = self.base.task_mean(self.metric_fn, outputs.detach(), targets)
        loss.backward()
        loss_value, metric_value = torch.stack([loss.detach(), metric]).tolist()
        return {
            "loss_pre": loss_value,
            "loss_post": loss_value,
            "metric_pre": metric_value,
            "metric_post": metric_value,
        }

    def meta_gradient(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """`meta_backward`: the training step `MetaStep` runs for the baseline."""
        return self.meta_backward(batch, inner_steps, measure_before)

    # Everything else is the base engine's, unchanged: the comparison with MAML isolates how the
    # network was trained, not how it is adapted or scored.

    def task_outputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.task_outputs(x)

    def task_mean(self, fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base.task_mean(fn, outputs, targets)

    def adaptation_curve(self, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        return self.base.adaptation_curve(batch, steps)

    def predictions(
        self, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor, steps: list[int]
    ) -> dict[int, torch.Tensor]:
        return self.base.predictions(support_x, support_y, x, steps)
