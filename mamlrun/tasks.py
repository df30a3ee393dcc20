"""Few-shot tasks: the `TaskBatch` every engine consumes, and the sinusoid task sampler.

A task is a support set (what the learner adapts on) and a query set (what the adapted learner is
scored on). Samplers draw whole meta-batches as stacked tensors, so an engine can loop over tasks
(learn2learn) or map over them (vectorized). Every sampler owns its random generator and exposes
`state_dict()` / `load_state_dict()`, so a resumed run draws exactly the tasks it would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mamlrun.errors import UserError


@dataclass
class TaskBatch:
    """A meta-batch of tasks, stacked on dimension 0.

    Args:
        support_x: [tasks, support size, *input shape]
        support_y: [tasks, support size, *target shape] (float targets or int64 class labels)
        query_x: [tasks, query size, *input shape]
        query_y: [tasks, query size, *target shape]
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def task(self, index: int) -> tuple[torch.Tensor, ...]:
        """The four tensors of one task."""
        return tuple(t[index] for t in self.tensors())

    def slice(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(*(t[start:stop] for t in self.tensors()))


class SinusoidTasks:
    """Sinusoid regression tasks y = A sin(x - phase) (Finn et al. 2017, Sec. 5.1).

    Support and query x are drawn separately from U[x_range]; with `query_grid` the query is
    instead `query_grid` evenly spaced points over x_range, as used to score a fit on the whole
    interval at test time.

    Args:
        shots: K, support points per task.
        query_shots: query points per task (ignored when `query_grid` is set).
        amplitude, phase, x_range: [low, high] of the uniform distributions.
        seed: seeds this sampler's own generator (independent of global RNGs).
        query_grid: if set, the number of evenly spaced query points.
        device: where tasks are drawn (the training device: no host-to-device copies).
    """

    task_type = "regression"

    def __init__(
        self,
        shots: int,
        query_shots: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        query_grid: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shots, self.query_shots, self.query_grid = shots, query_shots, query_grid
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _uniform(self, low_high: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = low_high
        draw = torch.rand(*shape, 1, generator=self.generator, device=self.device)
        return low + (high - low) * draw

    def sample(self, num_tasks: int) -> TaskBatch:
        """Draw `num_tasks` tasks; also returns their amplitudes and phases as attributes."""
        amplitude = self._uniform(self.amplitude, num_tasks, 1)
        phase = self._uniform(self.phase, num_tasks, 1)
        support_x = self._uniform(self.x_range, num_tasks, self.shots)
        if self.query_grid is None:
            query_x = self._uniform(self.x_range, num_tasks, self.query_shots)
        else:
            grid = torch.linspace(*self.x_range, self.query_grid, device=self.device)
            query_x = grid.view(1, -1, 1).expand(num_tasks, -1, -1).clone()
        batch = TaskBatch(
            support_x,
            amplitude * torch.sin(support_x - phase),
            query_x,
            amplitude * torch.sin(query_x - phase),
        )
        batch.amplitude, batch.phase = amplitude.view(-1), phase.view(-1)
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        restore_generator(self.generator, state["generator"])


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Set a sampler's generator to a saved state.

    Raises:
        UserError: the state comes from a generator of another device type (a CUDA run resumed
            on a CPU or back): the two draw different streams, so the run could not continue
            the tasks it would have drawn.
    """
    if state.numel() != generator.get_state().numel():
        raise UserError(
            f"resume=: the checkpoint's task sampler drew its tasks on another device type than "
            f"{generator.device.type}; resume with the hardware the run was trained on"
        )
    generator.set_state(state.cpu())
