"""Build the parts of a run (device, task samplers, model, engine, optimizer) from typed config.

The one place where config sections become objects, shared by training and evaluation, so both
always build a run the same way.
"""

from __future__ import annotations

import random
from typing import Any

import hydra.utils
import numpy as np
import torch
from torch import nn

from mamlrun.config import Algorithm, Hardware, SinusoidDataset
from mamlrun.engine import Learn2LearnEngine
from mamlrun.errors import UserError
from mamlrun.models import build_model
from mamlrun.tasks import SinusoidTasks

# Seeds of the held-out task sets, offsets from eval.seed: validation never sees test tasks.
VALIDATION_SEED_OFFSET = 1


def select_device(hardware: Hardware) -> torch.device:
    """The training device; refuses CUDA when there is none instead of failing later."""
    device = torch.device(hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"hardware.device={hardware.device}: CUDA is not available on this machine "
            "(use hardware=cpu, or install a CUDA build of torch)"
        )
    torch.set_num_threads(hardware.threads)
    torch.use_deterministic_algorithms(hardware.deterministic, warn_only=True)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_type(dataset: Any) -> str:
    return "regression" if isinstance(dataset, SinusoidDataset) else "classification"


def task_sampler(
    dataset: Any, split: str, seed: int, shots: int | None = None
) -> SinusoidTasks:
    """A sampler of tasks of `split` ("train", "val", "test").

    Meta-training tasks have `dataset.shots` support and `dataset.query_shots` query points. Held-out
    sinusoid tasks are scored on `eval_query_points` evenly spaced points over the whole x range,
    as the paper's evaluation.
    """
    if isinstance(dataset, SinusoidDataset):
        return SinusoidTasks(
            shots=shots or dataset.shots,
            query_shots=dataset.query_shots,
            amplitude=tuple(dataset.amplitude),
            phase=tuple(dataset.phase),
            x_range=tuple(dataset.x_range),
            seed=seed,
            query_grid=None if split == "train" else dataset.eval_query_points,
        )
    raise UserError(f"dataset.name={dataset.name}: no task sampler for this dataset")


def eval_shots(dataset: Any, requested: list[int] | None) -> list[int]:
    """The K values evaluated: `eval.shots` if given, else the dataset's list."""
    if requested:
        return list(requested)
    return list(getattr(dataset, "eval_shots", None) or [dataset.shots])


def model_for(model_cfg: Any, dataset: Any) -> nn.Module:
    options = {k: v for k, v in vars(model_cfg).items() if k != "name"}
    if isinstance(dataset, SinusoidDataset):
        return build_model(model_cfg.name, 1, 1, **options)
    return build_model(model_cfg.name, None, dataset.ways, **options)


def engine_for(model: nn.Module, algorithm: Algorithm, dataset: Any) -> Learn2LearnEngine:
    return Learn2LearnEngine(
        model,
        inner_lr=algorithm.inner_lr,
        first_order=algorithm.first_order,
        task_type=task_type(dataset),
    )


def meta_optimizer(model: nn.Module, algorithm: Algorithm) -> torch.optim.Optimizer:
    build = hydra.utils.instantiate(algorithm.meta_optimizer)
    return build(model.parameters(), lr=algorithm.meta_lr)
