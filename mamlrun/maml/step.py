"""One meta-training step, as the training loop and the benchmark run it, optionally replayed as
a CUDA graph.

A step is: zero the gradients, let the engine accumulate the meta-gradient of a meta-batch, clip
it if asked, take the outer optimizer step. Two things here are for GPUs:

- the step's statistics stay 0-dim tensors on the device (`StepStats`), read only when the loop
  logs them, so Python never waits for the GPU between iterations and can launch the next
  iteration's kernels while the GPU still runs this one;
- with `cuda_graph=True` (`hardware.cuda_graphs`) the step of an engine whose `meta_gradient` is
  capturable (the vmap engine's) is captured once as a CUDA graph and replayed: a meta-iteration
  of the paper's conv4 is about a thousand small kernels, which eagerly leave the GPU mostly
  waiting for Python to launch them; a replay launches them all with one call
  (`mamlrun bench cuda_graphs=true` measures it, docs/benchmarks.md). The meta-batch is copied
  into fixed input buffers first (the sampler keeps running outside the graph, so its random
  state, checkpoints and resume work unchanged).

The captured step computes what the eager step computes (tests/test_gpu.py compares each
iteration's statistics, Adam state and update in float64), with three consequences a user sees:

- iterations that measure the pre-adaptation loss (the logged ones) run eagerly: they need an
  extra forward pass that the captured step does not have;
- the first `WARMUP_STEPS` iterations run eagerly on a side stream, as PyTorch requires before a
  capture; they are ordinary training iterations on their own meta-batches, not extra ones;
- the outer optimizer must be capturable: optimizers with a `capturable` option (Adam, AdamW,
  ...) get it switched on, SGD needs none, others are refused with a clear message.

Every step also returns `nonfinite`, a 0-dim statistic that is 1 where the meta-loss or the
meta-gradient (before clipping) holds a NaN or inf, or the update would leave the parameters or
the optimizer's state non-finite, checked on the device; see `MetaStep` for how such a step is
kept out of the parameters and the optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence

import torch

from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.engine import Engine, StepStats

# Eager iterations before the capture (PyTorch's whole-network capture example uses 3).
WARMUP_STEPS = 3


def can_be_captured(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can run inside a CUDA graph: it has a `capturable` option
    (Adam, AdamW, ...) or keeps no state on the host (SGD)."""
    return "capturable" in optimizer.defaults or type(optimizer) is torch.optim.SGD


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch the optimizer's `capturable` option; on, move its step counters to the device.

    Capturable optimizers keep their step count on the device; without it Adam reads the count
    on the host and a graph would replay the first step's bias correction forever. Off only
    changes groups with parameters on a CPU, where capturable Adam refuses to run: a run resumed
    on a CPU from a checkpoint of a captured run.

    Raises:
        UserError: capturable asked of an optimizer with host-side state and no such option.
    """
    if not capturable:
        for group in optimizer.param_groups:
            if group.get("capturable") and any(p.device.type == "cpu" for p in group["params"]):
                group["capturable"] = False
        return
    if not can_be_captured(optimizer):
        raise UserError(
            f"hardware.cuda_graphs=true: {type(optimizer).__name__} cannot be captured in a CUDA "
            "graph (it has no 'capturable' option); use torch.optim.Adam / AdamW / SGD as "
            "algorithm.meta_optimizer or set hardware.cuda_graphs=false"
        )
    if "capturable" not in optimizer.defaults:
        return  # SGD: no step counter, nothing on the host
    for group in optimizer.param_groups:
        group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state and state["step"].device != param.device:  # from a CPU checkpoint
                state["step"] = state["step"].to(param.device, torch.float32)


class MetaStep:
    """Zero gradients, meta-gradient, clip, optimizer step; eager or as a replayed CUDA graph.

    Args:
        engine: a MAML engine; its `meta_gradient` computes the step's meta-gradient.
        optimizer: the outer optimizer over `engine.model`'s parameters.
        grad_clip: clip each meta-gradient element to [-grad_clip, grad_clip]; None: no clipping.
        cuda_graph: capture the step as a CUDA graph (the model must be on a CUDA device and the
            engine `capturable`).
        bf16: run the step's forward passes under bf16 autocast (`hardware.precision=bf16`):
            matmuls and convolutions in bfloat16, losses and batch norm in float32, parameters,
            gradients and the optimizer in float32.
        skip_nonfinite: also keep a non-finite step out of the update where that needs the host
            to read the flag (`train.on_nonfinite=skip`); see below.
        reduce: called with the step's statistics right after the engine's `meta_gradient`,
            before clipping and the optimizer step; returns the statistics to report. Data-parallel
            training sums the meta-gradients of several processes here
            (`mamlrun.run.distributed.MetaGradientSum`); None: one process.

    A step whose meta-loss or meta-gradient is not finite, or whose update would leave a
    parameter or the optimizer's state non-finite (a finite meta-gradient whose square overflows
    Adam's second moment), has `nonfinite` = 1 and is not applied: parameters and optimizer
    state (Adam's moments and step count included) stay as they were.
    Where the optimizer's state lives on the parameters' device (a CPU run; a captured step,
    whose optimizer is capturable) this is a branch-free masked update: the parameters and state
    are copied before `optimizer.step()` and put back with `torch.where(finite, new, old)`, which
    a CUDA graph replays without the host reading the flag, and which for a finite step returns
    exactly the new values (bit-identical runs). Elsewhere (an eager step on a GPU whose Adam keeps
    its step count on the host; the first step, before the optimizer has state) the host reads
    the flag after the step and, if it is set, restores the parameters and the optimizer's state
    dict: on a GPU that waits for the step, so it is done only with `skip_nonfinite`; without it
    the step is applied and the caller, which reads `nonfinite` before it writes anything, stops
    the run. The captured path keeps warming up eagerly until the optimizer has state, so the
    capture always holds the masked update.

    Example:
        >>> step = MetaStep(engine, optimizer, grad_clip=None)
        >>> stats = step(batch, inner_steps=1, measure_before=False)
        >>> float(stats["loss_post"])
    """

    def __init__(
        self,
        engine: Engine,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = None,
        cuda_graph: bool = False,
        bf16: bool = False,
        skip_nonfinite: bool = False,
        reduce: Callable[[StepStats], StepStats] | None = None,
    ) -> None:
        self.engine = engine
        self.reduce = reduce
        self.skip_nonfinite = skip_nonfinite
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.cuda_graph = cuda_graph
        self.bf16 = bf16
        if cuda_graph and not engine.capturable:
            raise UserError(
                "hardware.cuda_graphs=true needs algorithm.engine=vmap and MAML (the learn2learn "
                "engine and the pretrained baseline read values on the host every step)"
            )
        set_capturable(optimizer, cuda_graph)
        self._eager_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] | None = None  # the graph's fixed input buffers
        self._outputs: dict[str, torch.Tensor] = {}  # overwritten by every replay
        self._captured_steps: int | None = None
        # Warm-up and capture share one side stream: libraries cache handles and workspaces per
        # stream, and creating them during the capture would fail it.
        self._stream: torch.cuda.Stream | None = None

    def _parameters(self) -> Iterable[torch.Tensor]:
        return self.engine.model.parameters()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        device = next(iter(self._parameters())).device.type
        # no cache of cast weights: a CUDA graph capture refuses it, and every inner step has new
        # per-task weights anyway
        return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)

    def _step(self, batch: TaskBatch, inner_steps: int, measure_before: bool) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            stats = self.engine.meta_gradient(batch, inner_steps, measure_before=measure_before)
        if self.reduce is not None:
            stats = self.reduce(stats)
        if not self.skip_nonfinite:
            # `stop`: the step is applied and flagged by its loss alone (one cheap kernel); the
            # caller calls `state_is_finite` before it writes anything, which catches the rest
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_value_(self._parameters(), self.grad_clip)
            self.optimizer.step()
            return {**stats, "nonfinite": (~self._finite_loss(stats["loss_post"])).float()}
        finite = self._finite(stats["loss_post"])
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self._parameters(), self.grad_clip)
        finite = self._update(finite)
        return {**stats, "nonfinite": (~finite).to(torch.float32)}

    def _finite_loss(self, loss: torch.Tensor | float) -> torch.Tensor:
        device = next(iter(self._parameters())).device
        return torch.isfinite(torch.as_tensor(loss, dtype=torch.float32, device=device))

    def state_is_finite(self) -> bool:
        """Whether every parameter and optimizer state tensor is finite (reads it on the host):
        what `train.on_nonfinite=stop` checks before it writes a checkpoint, a log or a
        validation row. A non-finite meta-gradient shows up here after the step it spoiled, and
        so does a finite one whose square overflowed Adam's second moment."""
        device = next(iter(self._parameters())).device
        return bool(all_finite(self._update_state() or list(self._parameters()), device))

    def _finite(self, loss: torch.Tensor | float) -> torch.Tensor:
        """A 0-dim bool on the device: the meta-loss and every meta-gradient element are finite."""
        device = next(iter(self._parameters())).device
        loss = torch.as_tensor(loss, dtype=torch.float32, device=device).reshape(())
        grads = [p.grad for p in self._parameters() if p.grad is not None]
        return all_finite([loss, *grads], device)

    def _update(self, finite: torch.Tensor) -> torch.Tensor:
        """`optimizer.step()` unless `finite` is false or the step would leave a parameter or
        the optimizer's state non-finite (a finite gradient whose square overflows Adam's second
        moment); then nothing changes (see the class). Returns whether the step was applied."""
        tensors = self._update_state()
        if tensors is not None and all(t.device == finite.device for t in tensors):
            saved = [t.detach().clone() for t in tensors]
            self.optimizer.step()
            finite = finite & all_finite(tensors, finite.device)
            masked_restore(tensors, saved, finite)
            return finite
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved, saved_state = (
            [p.detach().clone() for p in params],
            copy.deepcopy(self.optimizer.state_dict()),
        )
        self.optimizer.step()
        finite = finite & all_finite(self._update_state() or [], finite.device)
        if not bool(finite):  # the host reads the flag: free on a CPU, a wait on a GPU
            masked_restore(params, saved, finite)
            self.optimizer.load_state_dict(saved_state)
        return finite

    def _update_state(self) -> list[torch.Tensor] | None:
        """The parameters and the optimizer's state tensors an update changes; None before
        the optimizer's first step (its state does not exist yet)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._needs_state() and not all(self.optimizer.state.get(p) for p in params):
            return None
        state = [v for p in params for v in self.optimizer.state.get(p, {}).values()]
        return params + [v for v in state if isinstance(v, torch.Tensor)]

    def _needs_state(self) -> bool:
        """Whether the optimizer keeps per-parameter state (all but plain SGD do)."""
        group = self.optimizer.param_groups[0]
        return type(self.optimizer) is not torch.optim.SGD or group.get("momentum", 0) != 0

    def __call__(self, batch: TaskBatch, inner_steps: int, measure_before: bool) -> StepStats:
        """One meta-training iteration on `batch`; returns its statistics without waiting."""
        if not self.cuda_graph or measure_before:
            return self._step(batch, inner_steps, measure_before)
        if self._graph is not None and inner_steps != self._captured_steps:
            raise ValueError("a captured MetaStep always runs the inner_steps it was captured with")
        if self._inputs is None:
            self._inputs = tuple(t.clone() for t in batch.tensors())
        else:
            for buffer, tensor in zip(self._inputs, batch.tensors(), strict=True):
                buffer.copy_(tensor)
        inputs = TaskBatch(*self._inputs)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if self._eager_steps < WARMUP_STEPS or self._update_state() is None:
            self._eager_steps += 1
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                stats = self._step(inputs, inner_steps, measure_before=False)
            torch.cuda.current_stream().wait_stream(self._stream)
            return stats
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self._graph, stream=self._stream):
                self._outputs = self._step(inputs, inner_steps, measure_before=False)
            self._captured_steps = inner_steps
        self._graph.replay()  # capturing ran nothing: the replay is this iteration
        # the graph overwrites its outputs on the next replay: keep a copy (one small kernel)
        values = torch.stack(list(self._outputs.values()))
        return dict(zip(self._outputs, values.unbind(), strict=True))


def all_finite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim bool on `device`: every element of the floating-point `tensors` there is finite
    (the largest absolute value of each, one fused kernel, their max (a sum could overflow) and
    one isfinite; no host wait)."""
    floats = [t for t in tensors if t.is_floating_point() and t.device == device]
    if not floats:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(floats, float("inf"))
    return torch.isfinite(torch.stack([n.float() for n in norms]).amax())


def masked_restore(
    tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], keep_new: torch.Tensor
) -> None:
    """Put `saved` back into `tensors` unless `keep_new` (a 0-dim bool on their device), without
    the host reading it: what a CUDA graph can replay."""
    with torch.no_grad():
        for tensor, old in zip(tensors, saved, strict=True):
            tensor.copy_(torch.where(keep_new, tensor, old))


def read_stats(window: list[StepStats]) -> list[dict[str, float]]:
    """The statistics of several steps as floats (waits for the last of those steps)."""
    return [{key: float(value) for key, value in stats.items()} for stats in window]
