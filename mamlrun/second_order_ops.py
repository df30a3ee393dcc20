"""Grouped convolution and batch norm + ReLU with their second derivatives written by hand.

Second-order MAML differentiates the inner-loop gradient, so every layer's backward pass is itself
differentiated once more (the "double backward"). PyTorch builds that double backward from the
first backward's operations, and for the paper's conv4 on a CPU two of them dominate the
meta-iteration (profile of Omniglot 5-way 1-shot, 32 tasks, `mamlrun/task_batched.py` layout):

- grouped convolution (one group per task): PyTorch's double backward computes two of its four
  terms with a Python-level loop over the groups, 32 small convolutions each;
- batch norm written out as `(x - mean) * rsqrt(var + eps) + bias`, then ReLU: autograd's first
  backward of these seven operations is about fifteen full passes over the activations, and its
  double backward about forty. On a CPU each pass is bound by memory bandwidth.

The Functions below compute the same numbers with one grouped `convolution_backward` call per term
and with the batch-norm derivatives in closed form (about five passes for the first backward, nine
for the second). Measured side by side on a 2-core CPU, second-order MAML on Omniglot 5w1s runs
about 1.4x faster (`mamlrun bench ablation=true`, docs/benchmarks.md).

Each Function's backward is itself a Function (`_GroupedConvGrad`, `_BatchNormReLUGrad`) whose
backward is the hand-written second derivative, which builds no graph: MAML's outer backward
differentiates every inner gradient exactly once (a later inner step's gradient is taken w.r.t.
the adapted parameters and never re-enters an earlier step's backward), so third derivatives are
never needed, and asking for one raises an error that says so. (PyTorch's `once_differentiable`
is not used: under `torch.autograd.grad(..., inputs)` it silently drops the third-order terms.)

The batch-norm second derivative, per channel c over its M reduced elements, with
x̂ = (x - mean) r, r = (var + eps)^-1/2, gz the gradient after the ReLU mask and
ĝ = gz - mean(gz) - x̂ mean(gz x̂) (so the first backward is gx = r ĝ, gbias = Σ gz):
given u = d(loss)/d(gx) and v = d(loss)/d(gbias),

    d(loss)/d(gz) = r (u - mean(u) - x̂ mean(u x̂)) + v
    d(loss)/d(x)  = -r² (mean(u x̂) ĝ + mean(gz x̂) (u - mean(u) - x̂ mean(u x̂)) + mean(u ĝ) x̂)

(the ReLU mask is piecewise constant, so it only masks d(loss)/d(gz) into d(loss)/d(gy)). Written
with the projected vectors ĝ and û rather than expanded sums, which would cancel in float32.
tests/test_second_order_ops.py checks both Functions against PyTorch's own derivatives and with
`gradgradcheck`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_conv_backward = torch.ops.aten.convolution_backward
_relu_backward = torch.ops.aten.threshold_backward


def _second_derivative(backward):
    """Mark a hand-written second derivative: it builds no graph, so it refuses to run where a
    graph is asked for (a third derivative) instead of silently returning part of one."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "mamlrun.second_order_ops computes second derivatives only, and a third was "
                "asked for (backward with create_graph=True through a meta-gradient); run the "
                "model through vmap (VmapEngine(batching='vmap')) or algorithm.engine=learn2learn"
            )
        return backward(ctx, *grads)

    return wrapper


class _ConvSpec:
    """Stride, padding, dilation and groups of a 2-D convolution, in `convolution_backward` form."""

    def __init__(self, stride, padding, dilation, groups: int) -> None:
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups

    def forward(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_out, x, weight, mask, bias_sizes=None):
        """(grad wrt x, grad wrt weight, grad wrt bias) of conv(x, weight); None where mask is
        False. One grouped call, whatever the number of groups."""
        return _conv_backward(
            grad_out,
            x,
            weight,
            bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            (0, 0),
            self.groups,
            mask,
        )


class _GroupedConv(torch.autograd.Function):
    """conv2d(x, weight, bias); its backward is `_GroupedConvGrad`, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: _ConvSpec):
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return spec.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _GroupedConvGrad.apply(grad_out, x, weight, ctx.spec, need_x, ctx.has_bias)
        grad_x, grad_weight, grad_bias = grads
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            None,
        )


class _GroupedConvGrad(torch.autograd.Function):
    """The first backward of a convolution, as a differentiable function of (grad_out, x, weight).

    Always returns three tensors (autograd Functions cannot return None); the ones not asked for
    are empty and receive no gradient.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, spec: _ConvSpec, need_x: bool, has_bias: bool):
        ctx.set_materialize_grads(False)  # unused outputs arrive as None, not as zeros to convolve
        bias_sizes = [weight.shape[0]] if has_bias else None
        grad_x, grad_weight, grad_bias = spec.backward(
            grad_out, x, weight, (need_x, True, has_bias), bias_sizes
        )
        ctx.save_for_backward(grad_out, x, weight)
        ctx.spec = spec
        empty = grad_out.new_empty(0)
        return (
            empty if grad_x is None else grad_x,
            grad_weight,
            empty if grad_bias is None else grad_bias,
        )

    @staticmethod
    @_second_derivative
    def backward(ctx, gg_x, gg_weight, gg_bias):
        """Gradients wrt (grad_out, x, weight), given those wrt (grad_x, grad_weight, grad_bias).

        grad_x = conv_transpose(grad_out, weight) and grad_weight = corr(x, grad_out) are bilinear,
        so each term is one convolution or one convolution backward with the roles swapped.
        """
        grad_out, x, weight = ctx.saved_tensors
        spec = ctx.spec
        need_grad_out, need_x, need_weight = ctx.needs_input_grad[:3]
        has_gg_x = gg_x is not None and gg_x.numel() > 0
        has_gg_bias = gg_bias is not None and gg_bias.numel() > 0
        d_grad_out = d_x = d_weight = None
        if need_grad_out:
            terms = []
            if gg_weight is not None:
                terms.append(spec.forward(x, gg_weight))
            if has_gg_x:
                terms.append(spec.forward(gg_x, weight))
            if has_gg_bias:
                terms.append(gg_bias.view(1, -1, 1, 1).expand_as(grad_out))
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_weight is not None:
            d_x = spec.backward(grad_out, x, gg_weight, (True, False, False))[0]
        if need_weight and has_gg_x:
            d_weight = spec.backward(grad_out, gg_x, weight, (False, True, False))[1]
        return d_grad_out, d_x, d_weight, None, None, None


def grouped_conv2d(x, weight, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation, groups)`, same values and
    gradients, with a double backward that makes one grouped call per term."""
    return _GroupedConv.apply(x, weight, bias, _ConvSpec(stride, padding, dilation, groups))


class _BatchNormReLU(torch.autograd.Function):
    """relu((x - mean) * rsqrt(var + eps) + bias), statistics over `dims` (ReLU optional)."""

    @staticmethod
    def forward(ctx, x, bias, dims: tuple[int, ...], eps: float, relu: bool):
        centered = x - x.mean(dims, keepdim=True)
        # Mean of squares of the centered values: two passes, as accurate as `var` here, and 5x
        # faster than its Welford kernel on strided reductions (no autograd runs through it).
        rstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
        normalized = centered.mul_(rstd)
        y = normalized + bias
        if relu:
            y.clamp_min_(0)
        ctx.save_for_backward(x, normalized, rstd, y)
        ctx.dims, ctx.relu = dims, relu
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, normalized, rstd, y = ctx.saved_tensors
        grad_x, grad_bias = _BatchNormReLUGrad.apply(
            grad_y, x, normalized, rstd, y, ctx.dims, ctx.relu
        )
        return grad_x, grad_bias, None, None, None


class _BatchNormReLUGrad(torch.autograd.Function):
    """The first backward of `_BatchNormReLU`, differentiable in (grad_y, x).

    `normalized`, `rstd` and `y` are functions of x saved by the forward; x itself is an input
    only so that the second derivative reaches it.
    """

    @staticmethod
    def forward(ctx, grad_y, x, normalized, rstd, y, dims, relu):
        ctx.set_materialize_grads(False)
        grad_z = _relu_backward(grad_y, y, 0) if relu else grad_y
        grad_bias = grad_z.sum(dims, keepdim=True)
        mean_grad = grad_bias / (grad_z.numel() // grad_bias.numel())
        mean_grad_normalized = (grad_z * normalized).mean(dims, keepdim=True)
        projected = torch.addcmul(grad_z - mean_grad, normalized, -mean_grad_normalized)
        ctx.save_for_backward(projected, normalized, rstd, y, mean_grad_normalized)
        ctx.dims, ctx.relu = dims, relu
        return projected * rstd, grad_bias

    @staticmethod
    @_second_derivative
    def backward(ctx, gg_x, gg_bias):
        """The closed form in the module docstring: u = gg_x, v = gg_bias."""
        if gg_x is None and gg_bias is None:
            return None, None, None, None, None, None, None
        projected, normalized, rstd, y, mean_grad_normalized = ctx.saved_tensors
        dims = ctx.dims
        d_x = None
        if gg_x is not None:
            mean_u = gg_x.mean(dims, keepdim=True)
            mean_u_normalized = (gg_x * normalized).mean(dims, keepdim=True)
            mean_u_projected = (gg_x * projected).mean(dims, keepdim=True)
            u_projected = torch.addcmul(gg_x - mean_u, normalized, -mean_u_normalized)
            minus_r2 = -(rstd * rstd)
            d_x = (
                ((minus_r2 * mean_u_normalized) * projected)
                .addcmul_(u_projected, minus_r2 * mean_grad_normalized)
                .addcmul_(normalized, minus_r2 * mean_u_projected)
            )
            d_grad_z = u_projected.mul_(rstd)
            if gg_bias is not None:
                d_grad_z += gg_bias
        else:
            d_grad_z = gg_bias.expand_as(projected)
        d_grad_y = None
        if ctx.needs_input_grad[0]:
            d_grad_y = _relu_backward(d_grad_z, y, 0) if ctx.relu else d_grad_z
        return d_grad_y, d_x, None, None, None, None, None


def batch_norm_relu(
    x: torch.Tensor, bias: torch.Tensor, dims: tuple[int, ...], eps: float, relu: bool
) -> torch.Tensor:
    """Batch norm with batch statistics over `dims`, a shift (`bias`, broadcast to x), and
    optionally ReLU; the values and derivatives of
    `relu((x - x.mean(dims)) * rsqrt(x.var(dims, unbiased=False) + eps) + bias)`."""
    return _BatchNormReLU.apply(x, bias, tuple(dims), eps, relu)
