"""What a task type optimizes and reports: its loss, its metric, whether higher is better."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean()


# task type -> (loss, name of the reported metric, metric, whether higher is better)
TASK_TYPES: dict[str, tuple[LossFn, str, LossFn, bool]] = {
    "regression": (F.mse_loss, "mse", F.mse_loss, False),
    "classification": (F.cross_entropy, "acc", accuracy, True),
}
