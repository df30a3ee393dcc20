"""Grouped convolution and batch norm + ReLU with their second derivatives written by hand.

Second-order MAML differentiates the inner-loop gradient, so every layer's backward pass is itself
differentiated once more (the "double backward"). PyTorch builds that double backward from the
first backward's operations, and for the paper's conv4 on a CPU two of them dominate the
meta-iteration (profile of Omniglot 5-way 1-shot, 32 tasks, in `mamlrun.maml.task_batched`'s
layout):

- grouped convolution (one group per task): PyTorch's double backward computes two of its four
  terms with a Python-level loop over the groups, 32 small convolutions each;
- batch norm written out as `(x - mean) * rsqrt(var + eps) + bias`, then ReLU: autograd's first
  backward of these seven operations is about fifteen full passes over the activations, and its
  double backward about forty. On a CPU each pass is bound by memory bandwidth.

The Functions below compute the same numbers with one grouped `convolution_backward` call per term
and with the batch-norm derivatives in closed form (about five passes for the first backward, nine
for the second). Two more savings (`_InputConv`: the first layer as unfold + matmul;
`_GroupedConv`'s dense convolutions while every task still has the meta-weights) and the
batch-norm formulas compiled (`NormKernels`) complete it. Each was kept because it made the
second-order step faster when measured, as did letting glibc's malloc keep freed memory
(`mamlrun.run.runtime.keep_freed_memory`); docs/benchmarks.md records what was measured and on
which machines, and `mamlrun bench` measures the step again.

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
with the projected vectors ĝ and û = u - mean(u) - x̂ mean(u x̂) rather than as expanded sums of
means, which cancel in float32.
tests/test_second_order_ops.py checks both Functions against PyTorch's own derivatives and with
`gradgradcheck`.
"""

from __future__ import annotations

import functools
import logging
import warnings

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
                "mamlrun.maml.second_order computes second derivatives only, and a third was "
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

    def shared_forward(self, x, weight, bias=None):
        """The grouped convolution when every group has the same `weight` [O, C, kh, kw] (and
        bias [O]): one dense convolution of all groups' channels as a batch of N * groups."""
        n = x.shape[0]
        out = F.conv2d(
            x.reshape(n * self.groups, -1, *x.shape[2:]),
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
        )
        return out.view(n, -1, *out.shape[2:])

    def shared_input_grad(self, grad_out, x, weight):
        """Gradient wrt x of `shared_forward(x, weight)`, as one dense call."""
        n = x.shape[0] * self.groups
        grad_out = grad_out.reshape(n, -1, *grad_out.shape[2:])
        batch = x.reshape(n, -1, *x.shape[2:])
        return self.backward(grad_out, batch, weight, (True, False, False), groups=1)[0].view(
            x.shape
        )

    def backward(self, grad_out, x, weight, mask, bias_sizes=None, groups=None):
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
            self.groups if groups is None else groups,
            mask,
        )


class _GroupedConv(torch.autograd.Function):
    """conv2d(x, weight, bias); its backward is `_GroupedConvGrad`, with a hand-written backward.

    `shared`: None, or the one weight every group has ([O, C, kh, kw], values only) when the
    per-task weights are copies of the meta-parameters (the first inner step): the products with
    the weight itself then run as dense convolutions over N * groups examples: oneDNN's dense
    kernels are faster than its grouped ones, the more so the smaller the feature map. Gradients
    wrt the weight stay per group.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: _ConvSpec, shared):
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias, ctx.shared = spec, bias is not None, shared
        if shared is not None:
            return spec.shared_forward(x, shared, None if bias is None else bias[: len(shared)])
        return spec.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _GroupedConvGrad.apply(
            grad_out, x, weight, ctx.spec, need_x, ctx.has_bias, ctx.shared
        )
        grad_x, grad_weight, grad_bias = grads
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            None,
            None,
        )


class _GroupedConvGrad(torch.autograd.Function):
    """The first backward of a convolution, as a differentiable function of (grad_out, x, weight).

    Always returns three tensors (autograd Functions cannot return None); the ones not asked for
    are empty and receive no gradient.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, spec: _ConvSpec, need_x: bool, has_bias: bool, shared):
        ctx.set_materialize_grads(False)  # unused outputs arrive as None, not as zeros to convolve
        bias_sizes = [weight.shape[0]] if has_bias else None
        grouped_x = need_x and shared is None
        grad_x, grad_weight, grad_bias = spec.backward(
            grad_out, x, weight, (grouped_x, True, has_bias), bias_sizes
        )
        if need_x and shared is not None:
            grad_x = spec.shared_input_grad(grad_out, x, shared)
        ctx.save_for_backward(grad_out, x, weight)
        ctx.spec, ctx.shared = spec, shared
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
            if has_gg_x and ctx.shared is not None:
                terms.append(spec.shared_forward(gg_x, ctx.shared))
            elif has_gg_x:
                terms.append(spec.forward(gg_x, weight))
            if has_gg_bias:
                terms.append(gg_bias.view(1, -1, 1, 1).expand_as(grad_out))
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_weight is not None:
            d_x = spec.backward(grad_out, x, gg_weight, (True, False, False))[0]
        if need_weight and has_gg_x:
            d_weight = spec.backward(grad_out, gg_x, weight, (False, True, False))[1]
        return d_grad_out, d_x, d_weight, None, None, None, None


class _InputConv(torch.autograd.Function):
    """A grouped convolution of the network's input (no gradient wrt x) as unfold + matmul.

    On a first layer of grayscale images (one channel per group, Omniglot's) oneDNN's grouped
    kernels are slow, and every backward call copies the output gradient (larger than the input by
    the number of filters) into another layout. Unfolded once, the input's patches
    `cols` [N, groups, C*kh*kw, L] serve all three products the meta-iteration needs: the output,
    the weight gradient (patches times output gradient) and, in the double backward, the
    output-gradient term (patches times the weight gradient's gradient). All three are linear in
    what varies, so the second derivative is exact.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: _ConvSpec):
        groups, kernel = spec.groups, weight.shape[2:]
        cols = F.unfold(x, kernel, spec.dilation, spec.padding, spec.stride)
        cols = cols.view(x.shape[0], groups, -1, cols.shape[-1])  # [N, groups, C*kh*kw, L]
        out = torch.matmul(weight.view(1, groups, -1, cols.shape[2]), cols)  # [N, G, O/G, L]
        if bias is not None:
            out += bias.view(1, groups, -1, 1)
        ctx.save_for_backward(cols)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        height, width = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[2:], spec.padding, spec.dilation, kernel, spec.stride, strict=True
            )
        )
        return out.view(x.shape[0], -1, height, width)

    @staticmethod
    def backward(ctx, grad_out):
        (cols,) = ctx.saved_tensors
        grad_weight, grad_bias = _InputConvGrad.apply(grad_out, cols, ctx.weight_shape)
        return None, grad_weight, grad_bias if ctx.has_bias else None, None


class _InputConvGrad(torch.autograd.Function):
    """Weight and bias gradients of `_InputConv`, linear in grad_out."""

    @staticmethod
    def forward(ctx, grad_out, cols, weight_shape):
        ctx.set_materialize_grads(False)
        n, groups, _, positions = cols.shape
        ctx.original_shape = grad_out.shape
        grad_out = grad_out.reshape(n, groups, -1, positions)  # [N, G, O/G, L]
        grad_weight = torch.matmul(grad_out, cols.transpose(2, 3)).sum(0).view(weight_shape)
        ctx.save_for_backward(cols)
        ctx.grad_out_shape = grad_out.shape
        return grad_weight, grad_out.sum((0, 3)).flatten()

    @staticmethod
    @_second_derivative
    def backward(ctx, gg_weight, gg_bias):
        (cols,) = ctx.saved_tensors
        n, groups, out_per_group, positions = ctx.grad_out_shape
        d_grad_out = None
        if gg_weight is not None:
            d_grad_out = torch.matmul(gg_weight.reshape(1, groups, out_per_group, -1), cols)
        if gg_bias is not None:
            bias_term = gg_bias.view(1, groups, out_per_group, 1)
            d_grad_out = (
                bias_term.expand(ctx.grad_out_shape)
                if d_grad_out is None
                else (d_grad_out + bias_term)
            )
        if d_grad_out is not None:
            d_grad_out = d_grad_out.reshape(ctx.original_shape)
        return d_grad_out, None, None


# Largest input for which `_InputConv` is used, counted as input elements times kernel taps (the
# unfolded size at stride 1): Omniglot meta-batches are 1-2M; the bound keeps the unfolded copy's
# memory small for larger images.
_INPUT_CONV_MAX_ELEMENTS = 1 << 23


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls and convolutions in on x's device, None when it is off.

    The Functions below save their inputs and differentiate them by hand, so they cannot mix
    dtypes as autocast would: their entry points cast first and run them with autocast off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def grouped_conv2d(
    x, weight, bias, stride, padding, dilation, groups: int, shared_weight=None
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation, groups)`, same values and
    gradients, with a double backward that makes one grouped call (or matmul) per term.

    shared_weight: if every group's weight (and bias) is the same, that weight [O, C, kh, kw]:
    its values make the products with the weight dense convolutions (see `_GroupedConv`)."""
    dtype = _autocast_dtype(x)
    if dtype is not None:  # convolve in autocast's dtype, as F.conv2d would; casts are outside
        # the Functions, so autograd casts their gradients back (and differentiates the casts)
        cast = [None if t is None else t.to(dtype) for t in (x, weight, bias, shared_weight)]
        with torch.autocast(x.device.type, enabled=False):
            return grouped_conv2d(*cast[:3], stride, padding, dilation, groups, cast[3])
    spec = _ConvSpec(stride, padding, dilation, groups)
    # Only for one input channel per group: with RGB inputs (miniImageNet) oneDNN is not slow, and
    # a different summation order would change float32 roundings, so max-pooling ties would break
    # differently than in the learn2learn engine's (tests/test_engine_equivalence.py).
    unfolded = x.numel() * weight.shape[2] * weight.shape[3]
    one_channel = weight.shape[1] == 1
    if one_channel and not x.requires_grad and unfolded <= _INPUT_CONV_MAX_ELEMENTS:
        return _InputConv.apply(x, weight, bias, spec)
    shared = None if shared_weight is None else shared_weight.detach()
    return _GroupedConv.apply(x, weight, bias, spec, shared)


def _norm_forward(x, bias, dims: tuple[int, ...], eps: float, relu: bool):
    """(output, normalized input x̂, rstd) of batch norm + shift (+ ReLU).

    Written with in-place and fused (`addcmul`) operations where they save a pass: run eagerly on
    a CPU, every pass over the activations costs memory bandwidth."""
    centered = x - x.mean(dims, keepdim=True)
    # Mean of squares of the centered values: two passes, as accurate as `var` here, and faster
    # than its Welford kernel on strided reductions (no autograd runs through it).
    rstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    normalized = centered.mul_(rstd)
    y = normalized + bias
    return (y.clamp_min_(0) if relu else y), normalized, rstd


def _norm_backward(grad_y, normalized, rstd, y, dims: tuple[int, ...], relu: bool):
    """(gx, gbias, ĝ, mean(gz x̂)): the first backward and what the second one needs."""
    grad_z = _relu_backward(grad_y, y, 0) if relu else grad_y
    grad_bias = grad_z.sum(dims, keepdim=True)
    mean_grad = grad_bias / (grad_z.numel() // grad_bias.numel())
    mean_grad_normalized = (grad_z * normalized).mean(dims, keepdim=True)
    projected = torch.addcmul(grad_z - mean_grad, normalized, -mean_grad_normalized)
    return projected * rstd, grad_bias, projected, mean_grad_normalized


def _norm_double_backward(
    gg_x, gg_bias, projected, normalized, rstd, y, mean_grad_normalized, dims, relu: bool
):
    """(d gy, d x) given u = gg_x and v = gg_bias: the closed form in the module docstring."""
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
    d_grad_z = u_projected.mul_(rstd).add_(gg_bias)
    return (_relu_backward(d_grad_z, y, 0) if relu else d_grad_z), d_x


class NormKernels:
    """The three batch-norm formulas above, run eagerly or compiled by `torch.compile`.

    Eagerly each line is a pass over the activations, which on a CPU is bound by memory bandwidth;
    compiled (Inductor, `dynamic=True`: one compilation for all layer shapes) they fuse into a few
    loops that read the activations fewer times (`mamlrun bench ablation=true` compares the two).
    Compiling takes seconds once per process (and is cached on disk); if it fails (no C++
    compiler, unsupported platform), a one-line warning is printed and the eager formulas are used.
    """

    def __init__(self, compiled: bool) -> None:
        self._eager = (_norm_forward, _norm_backward, _norm_double_backward)
        # Wrapped on first use: setting up `torch.compile` itself takes time, which a model
        # without batch norm (the sinusoid MLP) should not pay.
        self._active = None if compiled else self._eager

    def _run(self, index: int, *args):
        if self._active is None:
            # Each layout (dims), ReLU flag and size class compiles once; a process that trains,
            # validates and benchmarks several settings needs more than the default 8 versions,
            # past which dynamo silently runs the function eagerly.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            self._active = tuple(torch.compile(f, dynamic=True) for f in self._eager)
        try:
            return self._active[index](*args)
        except Exception as error:  # compilation failed: say so once, then run eagerly
            if self._active is self._eager:
                raise
            warnings.warn(
                f"torch.compile of the batch-norm kernels failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); running them eagerly "
                "(set hardware.compile=false to skip compiling)",
                stacklevel=2,
            )
            self._active = self._eager
            return self._active[index](*args)

    def forward(self, *args):
        return self._run(0, *args)

    def backward(self, *args):
        return self._run(1, *args)

    def double_backward(self, *args):
        return self._run(2, *args)


EAGER_KERNELS = NormKernels(compiled=False)


@functools.cache
def compiled_kernels() -> NormKernels:
    """One compiled set per process, shared by every engine and layer."""
    # Inductor's C++ toolchain set-up logs "No CUDA runtime is found" on CPU-only machines: true,
    # expected, and not what a user of a CPU run needs to read.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return NormKernels(compiled=True)


class _BatchNormReLU(torch.autograd.Function):
    """relu((x - mean) * rsqrt(var + eps) + bias), statistics over `dims` (ReLU optional)."""

    @staticmethod
    def forward(ctx, x, bias, dims: tuple[int, ...], eps: float, relu: bool, kernels):
        y, normalized, rstd = kernels.forward(x, bias, dims, eps, relu)
        ctx.save_for_backward(x, normalized, rstd, y)
        ctx.dims, ctx.relu, ctx.kernels = dims, relu, kernels
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, normalized, rstd, y = ctx.saved_tensors
        grad_x, grad_bias = _BatchNormReLUGrad.apply(
            grad_y, x, normalized, rstd, y, ctx.dims, ctx.relu, ctx.kernels
        )
        return grad_x, grad_bias, None, None, None, None


class _BatchNormReLUGrad(torch.autograd.Function):
    """The first backward of `_BatchNormReLU`, differentiable in (grad_y, x).

    `normalized`, `rstd` and `y` are functions of x saved by the forward; x itself is an input
    only so that the second derivative reaches it.
    """

    @staticmethod
    def forward(ctx, grad_y, x, normalized, rstd, y, dims, relu, kernels):
        ctx.set_materialize_grads(False)
        grad_x, grad_bias, projected, mean_grad_normalized = kernels.backward(
            grad_y, normalized, rstd, y, dims, relu
        )
        ctx.save_for_backward(projected, normalized, rstd, y, mean_grad_normalized)
        ctx.dims, ctx.relu, ctx.kernels = dims, relu, kernels
        return grad_x, grad_bias

    @staticmethod
    @_second_derivative
    def backward(ctx, gg_x, gg_bias):
        if gg_x is None and gg_bias is None:
            return (None,) * 8
        projected, normalized, rstd, y, mean_grad_normalized = ctx.saved_tensors
        if gg_x is None:  # not in MAML, whose inner step uses both gradients
            gg_x = torch.zeros_like(projected)
        if gg_bias is None:
            gg_bias = torch.zeros_like(rstd)
        d_grad_y, d_x = ctx.kernels.double_backward(
            gg_x, gg_bias, projected, normalized, rstd, y, mean_grad_normalized, ctx.dims, ctx.relu
        )
        return d_grad_y, d_x, None, None, None, None, None, None


def batch_norm_relu(
    x: torch.Tensor,
    bias: torch.Tensor,
    dims: tuple[int, ...],
    eps: float,
    relu: bool,
    kernels: NormKernels = EAGER_KERNELS,
) -> torch.Tensor:
    """Batch norm with batch statistics over `dims`, a shift (`bias`, broadcast to x), and
    optionally ReLU; the values and derivatives of
    `relu((x - x.mean(dims)) * rsqrt(x.var(dims, unbiased=False) + eps) + bias)`.
    `kernels`: `EAGER_KERNELS` or `compiled_kernels()`. Under autocast (bf16) it normalizes in
    float32 and returns float32, as autocast runs normalization layers."""
    if _autocast_dtype(x) is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _BatchNormReLU.apply(x.float(), bias.float(), tuple(dims), eps, relu, kernels)
    return _BatchNormReLU.apply(x, bias, tuple(dims), eps, relu, kernels)
