"""A vectorized MAML engine: all tasks of a meta-batch in one call, with `torch.func`.

`Learn2LearnEngine` clones the model and runs forward / backward once per task, so small models
spend most of their time in Python and dispatch overhead. `VmapEngine` computes the same numbers
with one batched forward per inner step for the whole meta-batch:

- the meta-parameters are expanded to per-task copies [tasks, *shape] (views, no copy), so each
  task adapts its own parameters while backward still sums their gradients into the shared ones;
- `torch.func.functional_call` runs the model on those parameters and `torch.func.vmap` maps it
  over the tasks (support / query tensors on dim 0), so batch norm keeps per-task statistics;
- tasks do not interact, so the gradient of the mean task loss w.r.t. one task's copies is that
  task's own gradient over the number of tasks: one `torch.autograd.grad` on the batched tensors
  gives every task's inner gradient, with `create_graph=True` for second-order MAML and as a
  constant for first-order MAML. It was chosen over nesting `torch.func.grad` inside `vmap`,
  which ran slower when both were tried on the sinusoid MLP.

For models built only from the paper's layer types, the forward runs through
`mamlrun.maml.task_batched` (the same per-task computation written out as batched matmuls and
grouped convolutions) instead of `vmap`: same numbers, without vmap's generic batching.

Second-order MAML differentiates each layer's backward pass once more; for the written-out
convolutions and batch norm those second derivatives are hand-written (`mamlrun.maml.second_order`).

The results equal `Learn2LearnEngine`'s (tests/test_engine_equivalence.py); `mamlrun bench`
measures both against the learn2learn example (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, vmap

from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.objectives import TASK_TYPES, LossFn
from mamlrun.maml.second_order import EAGER_KERNELS, compiled_kernels
from mamlrun.maml.task_batched import task_batched_forward

_FIX = "use algorithm.engine=learn2learn"
# Words in the RuntimeErrors torch raises when vmap cannot batch a model's operations.
_VMAP_ERROR_WORDS = ("vmap", "batched", "functorch", "torch.func")


def _check_vmappable(model: nn.Module) -> None:
    """Reject up front what vmap can never run: modules that update running statistics in place.

    Raises:
        UserError: naming the module and the fix.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise UserError(
                f"model module {name or type(module).__name__!r} ({type(module).__name__} with "
                "track_running_stats=True) updates running statistics in place, so the model "
                f"cannot run under algorithm.engine=vmap; {_FIX} (or use batch norm without "
                "running statistics, like mamlrun.maml.models.BatchStatNorm)"
            )


@contextlib.contextmanager
def _vmap_errors() -> Iterator[None]:
    """Turn torch's "vmap cannot batch this" errors into a UserError with the fix."""
    try:
        yield
    except RuntimeError as error:
        if not any(word in str(error) for word in _VMAP_ERROR_WORDS):
            raise
        raise UserError(
            f"the model cannot run under algorithm.engine=vmap ({str(error).splitlines()[0]}); "
            f"{_FIX}"
        ) from error


def _batch_mean(fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over tasks of `fn` per task, in one call on [tasks, examples, ...] tensors.

    Every loss and metric of TASK_TYPES is a mean over a task's examples, and all tasks of a batch
    have as many examples, so the mean of the per-task means is the mean over all examples: no
    per-task call (or vmap) is needed.
    """
    return fn(outputs.flatten(0, 1), targets.flatten(0, 1))


class VmapEngine:
    """MAML with the tasks of a meta-batch vectorized by `torch.func.vmap`.

    Same interface and results as `Learn2LearnEngine`. The model must be runnable by
    `torch.func.functional_call` and batchable by `vmap`: no in-place buffer updates (batch norm
    with running statistics), no data-dependent Python control flow, no `.item()` in `forward`;
    otherwise a UserError says to use the learn2learn engine.

    Args:
        model: any such `nn.Module`; its parameters are the meta-parameters.
        inner_lr: alpha, the step size of each adaptation step (plain SGD on all parameters).
        first_order: drop the second-order terms of the meta-gradient (FOMAML).
        task_type: "regression" (MSE) or "classification" (cross-entropy, accuracy).
        curve_chunk: tasks adapted at once by `adaptation_curve`, to bound its memory.
        batching: "layers" runs models made only of the paper's layer types through
            `mamlrun.maml.task_batched` (same numbers, less overhead) and any other model through
            vmap; "vmap" always uses vmap.
        compile_kernels: on the "layers" path, run batch norm's formulas through
            `torch.compile` (`hardware.compile`; see `mamlrun.maml.second_order.NormKernels`).

    Example:
        >>> engine = VmapEngine(model, inner_lr=0.01, first_order=False)
        >>> stats = engine.meta_backward(batch, inner_steps=1)  # gradients now in model.grad
        >>> optimizer.step()
    """

    # `meta_gradient` keeps its statistics on the device and launches the same kernels for every
    # batch of the same shapes: it can be captured as a CUDA graph.
    capturable = True

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        first_order: bool = False,
        task_type: str = "regression",
        curve_chunk: int = 100,
        batching: str = "layers",
        compile_kernels: bool = False,
    ) -> None:
        _check_vmappable(model)
        self.model = model
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.task_type = task_type
        losses_and_metric = TASK_TYPES[task_type]
        self.loss_fn, self.metric_name, self.metric_fn, self.higher_is_better = losses_and_metric
        self.curve_chunk = curve_chunk
        self._names = [name for name, _ in model.named_parameters()]
        # Untying shared weights costs time on every call; only do it for models that have them.
        self._tied = len(list(model.named_parameters(remove_duplicate=False))) > len(self._names)
        # Per-task parameters and inputs on dim 0; "different" gives each task its own dropout
        # mask, as separate calls would.
        self._vmapped = vmap(self._call, randomness="different")
        self._vmapped_query = vmap(self._query_outputs, randomness="different")
        kernels = compiled_kernels() if compile_kernels else EAGER_KERNELS
        self._batched = task_batched_forward(model, kernels) if batching == "layers" else None
        self._forward = self._batched or self._vmapped

    def _call(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self._names, params, strict=True))
        return functional_call(self.model, named, (x,), tie_weights=self._tied)

    def _query_outputs(
        self, params: list[torch.Tensor], query_x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query outputs before adaptation (no graph) and after, in one vmap call.

        On small models the fixed cost of a vmap call is as large as the forward itself. "Before"
        uses the meta-parameters, which are the module's own: no `functional_call` needed.
        """
        with torch.no_grad():
            before = self.model(query_x)
        return before, self._call(params, query_x)

    def _query(
        self, params: list[torch.Tensor], query_x: torch.Tensor, measure_before: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Query outputs of all tasks before adaptation (no graph; None if not asked) and after."""
        if not measure_before:
            return None, self._forward(params, query_x)
        if self._batched is None:
            return self._vmapped_query(params, query_x)
        with torch.no_grad():
            before = self._batched(self._per_task(len(query_x), detach=True), query_x)
        return before, self._batched(params, query_x)

    def _per_task(self, tasks: int, detach: bool = False) -> list[torch.Tensor]:
        """The meta-parameters as per-task views [tasks, *shape]; backward sums them over tasks."""
        return [
            (p.detach() if detach else p).expand(tasks, *p.shape) for p in self.model.parameters()
        ]

    def _inner_step(
        self,
        params: list[torch.Tensor],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        create_graph: bool,
    ) -> list[torch.Tensor]:
        """One SGD step of every task on its support set: theta' = theta - alpha * grad."""
        # Gradients of the mean over tasks: each task's own gradient / tasks, hence the step size.
        loss = _batch_mean(self.loss_fn, self._forward(params, support_x), support_y)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        step = -self.inner_lr * len(support_x)
        return [p.add(g, alpha=step) for p, g in zip(params, grads, strict=True)]

    def meta_backward(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss over the batch into `.grad`.

        All tasks are adapted together, so the graph of the whole meta-batch is alive at once
        (more memory than the learn2learn engine, which backpropagates task by task).

        Args:
            measure_before: also measure the query loss before adaptation (an extra forward).

        Returns:
            query loss and metric after adaptation (`loss_post`, `metric_post`) and, if
            measured, before (`loss_pre`, `metric_pre`), averaged over tasks.
        """
        stats = self.meta_gradient(batch, inner_steps, measure_before)
        values = torch.stack(list(stats.values())).tolist()  # one device sync for all
        return dict(zip(stats, values, strict=True))

    def meta_gradient(
        self, batch: TaskBatch, inner_steps: int, measure_before: bool = True
    ) -> dict[str, torch.Tensor]:
        """`meta_backward` with its statistics left as 0-dim tensors on the device.

        Nothing here waits for the device, so a GPU can still be running one iteration while
        Python launches the next, and the whole call can be captured as a CUDA graph
        (`mamlrun.maml.step`).
        """
        support_x, support_y, query_x, query_y = batch.tensors()
        with _vmap_errors():
            params = self._per_task(len(batch))
            for _ in range(inner_steps):
                params = self._inner_step(
                    params, support_x, support_y, create_graph=not self.first_order
                )
            outputs_pre, outputs = self._query(params, query_x, measure_before)
            query_loss = _batch_mean(self.loss_fn, outputs, query_y)
            query_loss.backward()
        metric_is_loss = self.metric_fn is self.loss_fn  # regression: do not compute it twice
        stats = {"loss_post": query_loss.detach()}
        stats["metric_post"] = (
            stats["loss_post"]
            if metric_is_loss
            else _batch_mean(self.metric_fn, outputs.detach(), query_y)
        )
        if outputs_pre is not None:
            stats["loss_pre"] = _batch_mean(self.loss_fn, outputs_pre, query_y)
            stats["metric_pre"] = (
                stats["loss_pre"]
                if metric_is_loss
                else _batch_mean(self.metric_fn, outputs_pre, query_y)
            )
        return stats

    def task_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the meta-parameters on every task's examples x [tasks, examples, ...], each
        task on its own (batch norm statistics per task), in one batched call; with graph."""
        with _vmap_errors():
            return self._forward(self._per_task(len(x)), x)

    def task_mean(self, fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over tasks of `fn`, in one call over all examples, as `meta_gradient`
        reduces its losses (`_batch_mean`)."""
        return _batch_mean(fn, outputs, targets)

    def _adapted(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int
    ) -> Iterator[list[torch.Tensor]]:
        """Per-task parameters after 0, 1, ..., steps first-order steps (detached: test time)."""
        params = self._per_task(len(support_x), detach=True)
        yield params
        for _ in range(steps):
            # Values equal the second-order path; no graph through the steps is needed.
            params = [p.requires_grad_() for p in params]
            with torch.enable_grad():
                params = self._inner_step(params, support_x, support_y, create_graph=False)
            params = [p.detach() for p in params]
            yield params

    def adaptation_curve(self, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        """Query loss and metric after 0..steps adaptation steps, per task: [tasks, steps + 1].

        Tasks are adapted `curve_chunk` at a time; the meta-parameters are not modified.
        """
        loss = torch.empty(len(batch), steps + 1)
        metric = torch.empty(len(batch), steps + 1)
        per_task_loss = vmap(self.loss_fn)
        per_task_metric = vmap(self.metric_fn)
        with _vmap_errors():
            for start in range(0, len(batch), self.curve_chunk):
                stop = min(start + self.curve_chunk, len(batch))
                support_x, support_y, query_x, query_y = batch.slice(start, stop).tensors()
                for step, params in enumerate(self._adapted(support_x, support_y, steps)):
                    with torch.no_grad():
                        outputs = self._forward(params, query_x)
                        loss[start:stop, step] = per_task_loss(outputs, query_y).cpu()
                        metric[start:stop, step] = per_task_metric(outputs, query_y).cpu()
        return {"loss": loss, self.metric_name: metric}

    def predictions(
        self, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor, steps: list[int]
    ) -> dict[int, torch.Tensor]:
        """Outputs on `x` of the model adapted to one task's support set, for each step count."""
        outputs: dict[int, torch.Tensor] = {}
        with _vmap_errors():
            adapted = self._adapted(support_x.unsqueeze(0), support_y.unsqueeze(0), max(steps))
            for step, params in enumerate(adapted):
                if step in steps:
                    with torch.no_grad():
                        outputs[step] = self._forward(params, x.unsqueeze(0))[0]
        return outputs
