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

from typing import Any

import torch

from mamlrun.maml.batch import TaskBatch


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

    def __init__(self, base: Any) -> None:
        self.base = base
        self.model = base.model
        # The vmap engine runs all tasks in one batched call; other engines go task by task.
        self._task_outputs = getattr(base, "task_outputs", None)
        self.loss_fn, self.metric_fn = base.loss_fn, base.metric_fn
        self.metric_name, self.higher_is_better = base.metric_name, base.higher_is_better
        self.task_type = base.task_type
        # Test time is MAML's, unchanged: the comparison isolates how the network was trained.
        self.adaptation_curve = base.adaptation_curve
        self.predictions = base.predictions

    def meta_backward(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """Accumulate the gradient of the mean supervised loss over the batch into `.grad`.

        Every point of a task (support and query) is a training example for the shared
        parameters. Each task gets its own forward (one batched call for all tasks when the base
        is the vmap engine), so a model with batch norm normalizes per task as under MAML.

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
        if self._task_outputs is not None:
            # every task has as many examples: the mean over all is the mean of per-task means
            outputs, targets = self._task_outputs(inputs).flatten(0, 1), targets.flatten(0, 1)
            loss = self.loss_fn(outputs, targets)
            metric = self.metric_fn(outputs.detach(), targets)
        else:
            losses, metrics = [], []
            for x, y in zip(inputs, targets, strict=True):
                outputs = self.model(x)
                losses.append(self.loss_fn(outputs, y))
                metrics.append(self.metric_fn(outputs.detach(), y))
            loss, metric = torch.stack(losses).mean(), torch.stack(metrics).mean()
        loss.backward()
        loss_value, metric_value = torch.stack([loss.detach(), metric]).tolist()
        return {
            "loss_pre": loss_value,
            "loss_post": loss_value,
            "metric_pre": metric_value,
            "metric_post": metric_value,
        }
