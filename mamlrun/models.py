"""The paper's networks as plain `nn.Module` builders, behind a name registry.

Models know nothing about configs or meta-learning: any `nn.Module` mapping a batch of inputs to
outputs works with every engine (MAML is model-agnostic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def init_authors_linear(layer: nn.Linear, std: float = 0.01) -> None:
    """Initialise like the authors' TensorFlow code: truncated normal (std 0.01, cut at 2 std),
    zero bias. With PyTorch's default init a few sinusoid tasks diverge at 10 inner steps."""
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)


def mlp(
    in_features: int,
    out_features: int,
    hidden: list[int] | tuple[int, ...] = (40, 40),
    activation: str = "relu",
    init: str = "authors",
) -> nn.Sequential:
    """A fully connected network, e.g. the paper's 1-40-40-1 ReLU sinusoid regressor."""
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    if init == "authors":
        for layer in layers:
            if isinstance(layer, nn.Linear):
                init_authors_linear(layer)
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp}


def build_model(name: str, in_features: int, out_features: int, **options) -> nn.Module:
    """Build a registered model; `options` are the model config's keys besides `name`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (choices: {sorted(MODELS)})")
    return MODELS[name](in_features, out_features, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameters_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
