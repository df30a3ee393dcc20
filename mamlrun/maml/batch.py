"""`TaskBatch`: the meta-batch of few-shot tasks every engine consumes.

A task is a support set (what the learner adapts on) and a query set (what the adapted learner is
scored on). Samplers draw whole meta-batches as stacked tensors, so an engine can loop over tasks
(learn2learn) or map over them (vectorized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
