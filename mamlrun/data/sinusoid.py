"""The sinusoid regression tasks of Finn et al. 2017, Sec. 5.1.

Every sampler owns its random generator and exposes `state_dict()` / `load_state_dict()`, so a
resumed run draws exactly the tasks it would have drawn.
"""

from __future__ import annotations

import math

import torch

from mamlrun.data.rng import restore_generator
from mamlrun.maml.batch import TaskBatch


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
