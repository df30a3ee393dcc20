"""Task-batched forward passes for the layer types of the paper's networks, without vmap.

`torch.func.vmap` makes any model run on per-task parameters, but on small networks its generic
batching (and `functional_call`'s parameter swapping) costs as much as the arithmetic, so the
batched computation is written out here (conv4's convolutions and batch norms through
`mamlrun.maml.second_order`, whose second derivatives are hand-written);
`mamlrun bench ablation=true` measures it against vmap (docs/benchmarks.md). For an
`nn.Sequential` built only from the layers below, the vmap engine runs this module's forward
instead; any other model keeps vmap.

Layouts, with T tasks of N examples each:
- fully connected layers see [T, N, features] and run as one batched matmul (`baddbmm`);
- convolutions see the tasks folded into channels, [N, T * C, H, W], and run as one grouped
  convolution (`groups=T`), so batch norm's per-task statistics are ordinary per-channel ones and
  pooling and activations need no reshaping.

The numbers equal vmap's and learn2learn's (tests/test_engine_equivalence.py checks all three).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mamlrun.maml.models import BatchStatNorm, SpatialMean
from mamlrun.maml.second_order import EAGER_KERNELS, NormKernels, batch_norm_relu, grouped_conv2d

# params: per-task tensors [T, *shape] in `model.named_parameters()` order; x: [T, N, *input].
BatchedForward = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Identity)


class _Activations:
    """Activations of T tasks, either [T, N, ...] ("tasks") or [N, T * C, H, W] ("folded")."""

    def __init__(self, tensor: torch.Tensor, tasks: int, folded: bool = False) -> None:
        self.tensor, self.tasks, self.folded = tensor, tasks, folded

    def as_folded(self) -> torch.Tensor:
        if not self.folded:
            x = self.tensor  # [T, N, C, H, W]
            # contiguous: with one channel the reshape is a strided view, and convolution_backward
            # then copies its (much larger) output gradient into a matching layout on every call.
            self.tensor = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:]).contiguous()
            self.folded = True
        return self.tensor

    def as_tasks(self) -> torch.Tensor:
        if self.folded:
            x = self.tensor  # [N, T * C, *spatial]
            self.tensor = x.view(x.shape[0], self.tasks, -1, *x.shape[2:]).transpose(0, 1)
            self.folded = False
        return self.tensor


def _conv(layer: nn.Conv2d, h: _Activations, weight, bias) -> None:
    # Per-task parameters that are views of the meta-parameters (expanded: stride 0 over tasks,
    # the first inner step) are one weight for all tasks, which grouped_conv2d exploits.
    shared = weight.stride(0) == 0 and (bias is None or bias.stride(0) == 0)
    h.tensor = grouped_conv2d(
        h.as_folded(),
        weight.flatten(0, 1),
        None if bias is None else bias.flatten(),
        layer.stride,
        layer.padding,
        layer.dilation,
        groups=h.tasks,
        shared_weight=weight[0] if shared else None,
    )


def _linear(h: _Activations, weight, bias) -> None:
    x = h.as_tasks()  # [T, N, ..., in]
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(rows, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
    h.tensor = out.view(*x.shape[:-1], out.shape[-1])


def _norm_layout(h: _Activations) -> tuple[list[int], list[int]]:
    """The dims batch norm reduces over (a task's examples and positions, per channel) and the
    shape that broadcasts a per-task, per-channel parameter [T, C] against the activations."""
    x = h.tensor
    if h.folded:  # [N, T * C, H, W]: per-channel statistics are per-task statistics
        return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    return [1, *range(3, x.dim())], [h.tasks, 1, -1] + [1] * (x.dim() - 3)  # [T, N, C, ...]


def _batch_stat_norm(
    layer: BatchStatNorm, h: _Activations, bias, weight, relu: bool, kernels: NormKernels
) -> None:
    """Per task and channel: normalize over the task's examples (and positions), then shift (and
    scale), then the following ReLU if `relu`. Shift-only, the paper's, runs as one Function with
    hand-written derivatives (`mamlrun.maml.second_order`)."""
    dims, shape = _norm_layout(h)
    if weight is None:
        h.tensor = batch_norm_relu(
            h.tensor, bias.reshape(shape), tuple(dims), layer.eps, relu, kernels
        )
        return
    x = h.tensor
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    x = (x - mean) * torch.rsqrt(var + layer.eps) * weight.reshape(shape) + bias.reshape(shape)
    h.tensor = torch.relu(x) if relu else x


def _flatten(h: _Activations) -> None:
    h.tensor = h.as_tasks().flatten(2)


def _spatial_mean(h: _Activations) -> None:
    h.tensor = h.as_folded().mean(dim=(2, 3))  # [N, T * C]
    h.tensor = h.tensor.view(h.tensor.shape[0], h.tasks, -1).transpose(0, 1)
    h.folded = False


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    if isinstance(layer, nn.Flatten):
        return layer.start_dim == 1 and layer.end_dim == -1
    if isinstance(layer, nn.MaxPool2d):
        return not layer.return_indices
    return isinstance(layer, (nn.Linear, BatchStatNorm, SpatialMean, *_ELEMENTWISE))


def task_batched_forward(
    model: nn.Module, kernels: NormKernels = EAGER_KERNELS
) -> BatchedForward | None:
    """A forward over per-task parameters for `model`, or None when it has other layers.

    Only an `nn.Sequential` whose children are all of the supported types (Linear, Conv2d,
    BatchStatNorm, ReLU, Tanh, MaxPool2d, Flatten, SpatialMean), without shared weights,
    qualifies: anything else may behave in ways this module does not reproduce. `kernels` runs
    batch norm: eagerly or compiled (`mamlrun.maml.second_order.compiled_kernels()`).
    """
    if not isinstance(model, nn.Sequential):
        return None
    layers = list(model.named_children())
    if not all(_supported(layer) for _, layer in layers):
        return None
    names = [name for name, _ in model.named_parameters()]
    if len(names) != len(list(model.named_parameters(remove_duplicate=False))):
        return None  # tied weights

    # ReLUs right after a batch norm: the batch norm's Function applies them (one pass fewer).
    fused_relus = {
        index + 1
        for index, ((_, layer), (_, following)) in enumerate(
            zip(layers[:-1], layers[1:], strict=True)
        )
        if isinstance(layer, BatchStatNorm) and isinstance(following, nn.ReLU)
    }

    def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        named = dict(zip(names, params, strict=True))

        def param(layer_name: str, key: str) -> torch.Tensor | None:
            return named.get(f"{layer_name}.{key}")

        h = _Activations(x, tasks=x.shape[0])
        for index, (name, layer) in enumerate(layers):
            if index in fused_relus:
                continue  # the batch norm before it applied it
            if isinstance(layer, nn.Conv2d):
                _conv(layer, h, param(name, "weight"), param(name, "bias"))
            elif isinstance(layer, nn.Linear):
                _linear(h, param(name, "weight"), param(name, "bias"))
            elif isinstance(layer, BatchStatNorm):
                relu = index + 1 in fused_relus
                _batch_stat_norm(
                    layer, h, param(name, "bias"), param(name, "weight"), relu, kernels
                )
            elif isinstance(layer, nn.Flatten):
                _flatten(h)
            elif isinstance(layer, SpatialMean):
                _spatial_mean(h)
            elif isinstance(layer, nn.MaxPool2d):
                h.tensor = layer(h.as_folded())
            else:  # elementwise: any layout
                h.tensor = layer(h.tensor)
        return h.as_tasks()

    return forward
