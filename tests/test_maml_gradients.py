"""MAML correctness on a model small enough to differentiate by hand.

For a linear regressor f(x) = X w with MSE loss L(w) = |X w - y|^2 / n, one inner step gives
w' = w - a g_s with g_s = 2/n_s X_s^T (X_s w - y_s) and Hessian H_s = 2/n_s X_s^T X_s. The MAML
meta-gradient of the query loss is (I - a H_s) g_q(w'); first-order MAML drops H_s: g_q(w').
"""

import pytest
import torch
from torch import nn

from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.l2l_engine import Learn2LearnEngine


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons need double precision; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _linear_task_batch(tasks=3, dim=4, shots=6, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(tasks, shots, dim, generator=g),
        torch.randn(tasks, shots, 1, generator=g),
        torch.randn(tasks, queries, dim, generator=g),
        torch.randn(tasks, queries, 1, generator=g),
    )


def _hand_meta_gradient(w, batch, alpha, first_order):
    grads = []
    for xs, ys, xq, yq in zip(*batch.tensors(), strict=True):
        g_s = 2 / len(xs) * xs.T @ (xs @ w - ys)
        h_s = 2 / len(xs) * xs.T @ xs
        w_adapted = w - alpha * g_s
        g_q = 2 / len(xq) * xq.T @ (xq @ w_adapted - yq)
        grads.append(g_q if first_order else (torch.eye(len(w)) - alpha * h_s) @ g_q)
    return torch.stack(grads).mean(dim=0)


def _engine_meta_gradient(w, batch, alpha, first_order):
    model = nn.Linear(len(w), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.T)
    engine = Learn2LearnEngine(model, inner_lr=alpha, first_order=first_order)
    engine.meta_backward(batch, inner_steps=1)
    return model.weight.grad.T.clone()


def test_second_order_meta_gradient_matches_hand_derivation():
    batch = _linear_task_batch()
    w = torch.randn(4, 1, generator=torch.Generator().manual_seed(1))
    expected = _hand_meta_gradient(w, batch, alpha=0.1, first_order=False)
    actual = _engine_meta_gradient(w, batch, alpha=0.1, first_order=False)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_first_order_meta_gradient_is_query_gradient_at_adapted_parameters():
    batch = _linear_task_batch(seed=2)
    w = torch.randn(4, 1, generator=torch.Generator().manual_seed(3))
    expected = _hand_meta_gradient(w, batch, alpha=0.1, first_order=True)
    actual = _engine_meta_gradient(w, batch, alpha=0.1, first_order=True)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    second_order = _hand_meta_gradient(w, batch, alpha=0.1, first_order=False)
    assert not torch.allclose(actual, second_order), "first- and second-order must differ here"


def test_adaptation_curve_step_values_match_manual_gradient_descent():
    batch = _linear_task_batch(tasks=2)
    w = torch.randn(4, 1, generator=torch.Generator().manual_seed(4))
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.T)
    curve = Learn2LearnEngine(model, inner_lr=0.05).adaptation_curve(batch, steps=3)["loss"]
    for task, (xs, ys, xq, yq) in enumerate(zip(*batch.tensors(), strict=True)):
        v = w.clone()
        for step in range(4):
            expected = ((xq @ v - yq) ** 2).mean()
            torch.testing.assert_close(curve[task, step], expected)
            v = v - 0.05 * 2 / len(xs) * xs.T @ (xs @ v - ys)
    assert torch.equal(model.weight, w.T), "evaluation must not change the meta-parameters"
