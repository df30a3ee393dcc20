"""The paper's networks as plain `nn.Module` builders, behind a name registry.

Models know nothing about configs or meta-learning: any `nn.Module` mapping a batch of inputs to
outputs works with every engine (MAML is model-agnostic). Faithful to the authors' TensorFlow code
(cbfinn/maml): batch norm always normalizes with the current batch's statistics (no running
averages, in training and at test), has a learned shift but no learned scale
(`tf.contrib.layers.batch_norm` defaults: center=True, scale=False, epsilon=1e-3), and weights are
initialized as there (truncated normal 0.01 for fully connected layers, Glorot for convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class BatchStatNorm(nn.Module):
    """Batch norm that always uses the current batch's mean and variance, as MAML's code does.

    Args:
        features: channels (conv inputs [N, C, H, W]) or features ([N, C]).
        scale: learn a per-feature scale (gamma) besides the shift (beta); the authors' has none.
        eps: added to the variance; 1e-3 as TensorFlow's default.
    """

    def __init__(self, features: int, scale: bool = False, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.weight = nn.Parameter(torch.ones(features)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.batch_norm: its double backward fails without a weight
        # (second-order MAML differentiates through this twice).
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        return x + self.bias.view(shape)


def init_authors_linear(layer: nn.Linear, std: float = 0.01) -> None:
    """Truncated normal (std 0.01, cut at 2 std) weights, zero bias, as the authors' code.
    With PyTorch's default init a few sinusoid tasks diverge at 10 inner steps."""
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)


def mlp(
    in_shape: Sequence[int],
    out_features: int,
    hidden: Sequence[int] = (40, 40),
    activation: str = "relu",
    init: str = "authors",
    batch_norm: bool = False,
) -> nn.Sequential:
    """A fully connected network on flattened inputs.

    The paper's sinusoid regressor is 1-40-40-1 with ReLU and no batch norm; its Omniglot "no conv"
    baseline is 784-256-128-64-64-N with batch norm after every hidden layer.
    """
    sizes = [math.prod(in_shape), *hidden, out_features]
    layers: list[nn.Module] = [nn.Flatten()] if len(in_shape) > 1 else []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(fan_in, fan_out)
        if init == "authors":
            init_authors_linear(linear)
        layers.append(linear)
        if i < len(sizes) - 2:
            if batch_norm:
                layers.append(BatchStatNorm(fan_out))
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def conv4(
    in_shape: Sequence[int],
    out_features: int,
    filters: int = 64,
    pooling: str = "stride",
    head: str = "mean",
    init: str = "authors",
    head_init: str = "normal",
) -> nn.Sequential:
    """Four blocks of [3x3 conv, batch norm, ReLU] and a linear head.

    Omniglot (paper): 64 filters, stride-2 convolutions, no pooling, spatial mean, linear head.
    miniImageNet: 32 filters, stride-1 convolutions and 2x2 max-pooling, flatten, linear head.

    Args:
        pooling: "stride" (stride-2 convs) or "max" (stride-1 conv then 2x2 max-pool).
        head: "mean" (average over space) or "flatten".
        init: "authors" (Glorot conv weights, zero biases) or "torch" (PyTorch defaults).
        head_init: "normal" (std 1, the authors' Omniglot head), "xavier" (their miniImageNet head).
    """
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    for _ in range(4):
        stride = 2 if pooling == "stride" else 1
        conv = nn.Conv2d(channels, filters, 3, stride=stride, padding=1)
        if init == "authors":
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        layers += [conv, BatchStatNorm(filters), nn.ReLU()]
        if pooling == "max":
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        channels = filters
    if head == "mean":
        layers.append(SpatialMean())
        features = filters
    else:
        layers.append(nn.Flatten())
        features = filters * height * width
    linear = nn.Linear(features, out_features)
    if init == "authors":
        if head_init == "normal":
            nn.init.normal_(linear.weight, std=1.0)
        else:
            nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
    layers.append(linear)
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "conv4": conv4}


def build_model(name: str, in_shape: Sequence[int], out_features: int, **options) -> nn.Module:
    """Build a registered model; `options` are the model config's keys besides `name`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (choices: {sorted(MODELS)})")
    return MODELS[name](tuple(in_shape), out_features, **options)
