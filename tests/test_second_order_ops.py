"""The hand-written derivatives of mamlrun.maml.second_order equal PyTorch's.

Two independent checks: finite differences (`gradcheck` for the first derivative, `gradgradcheck`
for the second, which is what second-order MAML uses), and the values and first and second
derivatives of the same computation written with plain PyTorch operations, in float64 and float32.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mamlrun.maml.second_order import (
    EAGER_KERNELS,
    batch_norm_relu,
    compiled_kernels,
    grouped_conv2d,
)

# (x shape, reduced dims, bias shape): the folded conv layout [N, T*C, H, W] and the task layout
# [T, N, C] of fully connected layers, as mamlrun.maml.task_batched calls them.
NORM_LAYOUTS = {
    "conv": ((4, 6, 5, 5), (0, 2, 3), (1, 6, 1, 1)),
    "dense": ((3, 7, 4), (1,), (3, 1, 4)),
}


def _reference_norm(x, bias, dims, eps, relu):
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) + bias
    return torch.relu(y) if relu else y


def _norm_inputs(layout, dtype, seed=0):
    shape, dims, bias_shape = NORM_LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(bias_shape, generator=g, dtype=torch.float64).to(dtype)
    return x.requires_grad_(), bias.requires_grad_(), dims


def _conv_inputs(dtype, bias: bool, x_grad: bool, channels: int = 2, seed=0):
    groups, out_channels = 3, 4
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, groups * channels, 7, 7, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(groups * out_channels, channels, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(groups * out_channels, generator=g, dtype=torch.float64) if bias else None
    return (
        x.requires_grad_(x_grad),
        w.to(dtype).requires_grad_(),
        None if b is None else b.to(dtype).requires_grad_(),
        groups,
    )


def _first_and_second(fn, inputs, seed=1):
    """Output, gradient of a nonlinear scalar of the output, and gradient of a nonlinear scalar
    of that gradient: the same shape of computation as a MAML inner step and its meta-gradient."""
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    y = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    first = torch.autograd.grad((y * v).sum() + 0.1 * (y * y).sum(), wrt, create_graph=True)
    second = torch.autograd.grad(sum((f.sin() * (1 + f)).sum() for f in first), wrt)
    return [y.detach(), *[f.detach() for f in first], *second]


def _relative_errors(actual, expected):
    pairs = zip(actual, expected, strict=True)
    return [((a - e).norm() / e.norm().clamp_min(1e-30)).item() for a, e in pairs]


@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_relu_passes_gradcheck_and_gradgradcheck(layout, relu):
    x, bias, dims = _norm_inputs(layout, torch.float64)

    def fn(x, bias):
        return batch_norm_relu(x, bias, dims, 1e-3, relu)

    assert torch.autograd.gradcheck(fn, (x, bias))
    assert torch.autograd.gradgradcheck(fn, (x, bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_relu_matches_pytorch_composite(layout, relu, dtype):
    x, bias, dims = _norm_inputs(layout, dtype)
    ours = _first_and_second(lambda x, b: batch_norm_relu(x, b, dims, 1e-3, relu), (x, bias))
    reference = _first_and_second(lambda x, b: _reference_norm(x, b, dims, 1e-3, relu), (x, bias))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(_relative_errors(ours, reference)) < tolerance


def test_batch_norm_relu_second_derivative_through_the_bias_gradient_only():
    """The inner step of MAML uses both gradients (input and shift); a loss of the shift's
    gradient alone exercises the branch of the double backward without an input gradient."""
    x, bias, dims = _norm_inputs("conv", torch.float64)
    results = []
    for fn in (batch_norm_relu, _reference_norm):
        y = fn(x, bias, dims, 1e-3, True)
        v = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        grad_bias = torch.autograd.grad((y * y * v).sum(), bias, create_graph=True)[0]
        results.append(torch.autograd.grad((grad_bias**2).sum(), x))
    assert max(_relative_errors(*results)) < 1e-12


def _path(x_grad: bool, channels: int) -> str:
    """Which Function grouped_conv2d picks: unfold + matmul for a one-channel input without
    gradient (the first layer of Omniglot's conv4), grouped convolution otherwise."""
    return "_InputConv" if channels == 1 and not x_grad else "_GroupedConv"


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_grouped_conv_passes_gradcheck_and_gradgradcheck(bias, x_grad, channels):
    x, w, b, groups = _conv_inputs(torch.float64, bias, x_grad, channels)
    y = grouped_conv2d(x, w, b, (2, 2), (1, 1), (1, 1), groups)
    assert type(y.grad_fn).__name__ == _path(x_grad, channels) + "Backward"

    def fn(x, w, b):
        return grouped_conv2d(x, w, b, (2, 2), (1, 1), (1, 1), groups)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_grouped_conv_matches_pytorch_conv2d(dtype, bias, x_grad, channels):
    inputs = _conv_inputs(dtype, bias, x_grad, channels)
    groups = inputs[-1]
    ours = _first_and_second(
        lambda x, w, b: grouped_conv2d(x, w, b, (2, 2), (1, 1), (1, 1), groups), inputs[:3]
    )
    reference = _first_and_second(lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, groups), inputs[:3])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(_relative_errors(ours, reference)) < tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_conv_with_one_shared_weight_keeps_per_group_gradients(dtype):
    """At MAML's first inner step every task's weight is the meta-parameter: the products with the
    weight run as one dense convolution, but the gradients (and their derivatives) wrt each
    task's copy must stay those of the grouped convolution."""
    groups, channels, out_channels = 3, 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, groups * channels, 7, 7, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(out_channels, channels, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_channels, generator=g, dtype=torch.float64).to(dtype)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    # per-task copies, as the engine makes them: views of the meta-parameters, flattened
    weight = w.expand(groups, *w.shape).flatten(0, 1)
    bias = b.expand(groups, *b.shape).flatten()
    inputs = (x, weight, bias)
    ours = _first_and_second(
        lambda x, wt, bs: grouped_conv2d(x, wt, bs, (2, 2), (1, 1), (1, 1), groups, w), inputs
    )
    reference = _first_and_second(lambda x, wt, bs: F.conv2d(x, wt, bs, 2, 1, 1, groups), inputs)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(_relative_errors(ours, reference)) < tolerance


def test_third_derivatives_are_refused_not_wrong():
    """MAML needs second derivatives only; a third must fail loudly rather than be silently 0."""
    x, bias, dims = _norm_inputs("conv", torch.float64)
    y = batch_norm_relu(x, bias, dims, 1e-3, True)
    (grad_x,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives only"):
        torch.autograd.grad((grad_x**2).sum(), x, create_graph=True)


def test_compiled_kernels_match_eager_and_fall_back_when_compiling_fails(tmp_path):
    """Where torch.compile cannot build the kernels (here: no working C++ compiler, in a fresh
    process and cache), training goes on with the eager formulas after one warning."""
    script = """
import warnings, torch
from mamlrun.maml.second_order import EAGER_KERNELS, compiled_kernels
x, bias = torch.randn(4, 6, 5, 5), torch.randn(1, 6, 1, 1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = compiled_kernels().forward(x, bias, (0, 2, 3), 1e-3, True)
    again = compiled_kernels().forward(x, bias, (0, 2, 3), 1e-3, True)
eager = EAGER_KERNELS.forward(x, bias, (0, 2, 3), 1e-3, True)
assert all(torch.equal(a, b) for a, b in zip(compiled + again, eager + eager))
print(len(caught), caught[0].message if caught else "")
"""
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.strip().split(" ", 1)
    assert count == "1"
    assert "torch.compile of the batch-norm kernels failed" in message
    assert "hardware.compile=false" in message


@pytest.mark.parametrize("layout", NORM_LAYOUTS)
def test_compiled_kernels_match_eager(layout):
    """`hardware.compile` changes the speed of the batch-norm formulas, not their values."""
    x, bias, dims = _norm_inputs(layout, torch.float32)
    x, bias = x.detach(), bias.detach()
    g = torch.Generator().manual_seed(3)
    grad_y, gg_x = (torch.randn(x.shape, generator=g) for _ in range(2))
    gg_bias = torch.randn(bias.shape, generator=g)
    results = []
    for kernels in (compiled_kernels(), EAGER_KERNELS):
        y, normalized, rstd = kernels.forward(x, bias, dims, 1e-3, True)
        grad_x, grad_bias, projected, mean_gn = kernels.backward(
            grad_y, normalized, rstd, y, dims, True
        )
        second = kernels.double_backward(
            gg_x, gg_bias, projected, normalized, rstd, y, mean_gn, dims, True
        )
        results.append([y, grad_x, grad_bias, *second])
    assert max(_relative_errors(*results)) < 1e-5


@pytest.mark.parametrize("channels", [1, 2])
def test_conv_and_norm_under_bf16_autocast_are_as_accurate_as_pytorch_composite(channels):
    """`hardware.precision=bf16`: convolutions run in bfloat16 and batch norm in float32, as
    autocast runs PyTorch's own layers; gradients come back as float32. Rounding differs from the
    composite's, so both are compared with the float64 values: ours may not be less accurate."""
    x, w, _, groups = _conv_inputs(torch.float64, False, x_grad=channels == 2, channels=channels)
    shift = torch.randn(1, w.shape[0], 1, 1, generator=torch.Generator().manual_seed(3))
    exact = (x, w, None, shift.double().requires_grad_())
    single = [
        None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in exact
    ]

    def ours(x, w, b, shift):
        y = grouped_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups)
        return batch_norm_relu(y, shift, (0, 2, 3), 1e-3, True)

    def composite(x, w, b, shift):
        y = F.conv2d(x, w, b, 1, 1, 1, groups)
        return _reference_norm(y.float(), shift, (0, 2, 3), 1e-3, True)

    truth = [t.float() for t in _first_and_second(ours, exact)]
    errors = []
    for fn in (ours, composite):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            results = _first_and_second(fn, single)
        assert all(r.dtype == torch.float32 for r in results)
        errors.append(_relative_errors(results, truth))
    for ours_error, composite_error in zip(*errors, strict=True):
        assert ours_error < 2 * composite_error + 1e-2
