"""Test-time adaptation of one task as a standalone model: what `mamlrun adapt` hands the user.

The engines adapt batches of tasks with functional parameters and keep no module per task; a user
adapting a trained initialization to their own task wants the adapted network itself, to save,
export and call. `adapt_model` takes the same steps as the engines' evaluation (plain SGD of step
size alpha on the support loss, from the meta-learned initialization; first-order, as at test
time no meta-gradient flows) on a copy of the model. tests/test_adapt.py checks that its outputs
equal both engines' adapted predictions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mamlrun.maml.objectives import LossFn


def adapt_model(
    model: nn.Module,
    loss_fn: LossFn,
    inner_lr: float,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
) -> nn.Module:
    """A copy of `model` after `steps` steps theta <- theta - inner_lr * grad L_support(theta).

    Args:
        model: the meta-learned initialization (left unchanged).
        loss_fn: the task loss the model was meta-trained with (MSE, cross-entropy).
        inner_lr: alpha, the step size the model was meta-trained with.
        support_x, support_y: one task's support set, [K, ...] and [K, ...].
        steps: adaptation steps (0: the copy is the initialization).
    """
    adapted = copy.deepcopy(model).requires_grad_(True)
    params = list(adapted.parameters())
    for _ in range(steps):
        with torch.enable_grad():
            loss = loss_fn(adapted(support_x), support_y)
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.sub_(grad, alpha=inner_lr)
    return adapted.requires_grad_(False)
