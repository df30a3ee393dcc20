"""Build the parts of a run (device, task samplers, model, engine, optimizer) from typed config.

The one place where config sections become objects, shared by training and evaluation, so both
always build a run the same way.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import torch
from torch import nn

from mamlrun.config import (
    Algorithm,
    Hardware,
    ImageDataset,
    SinusoidDataset,
    TargetModel,
    error_line,
)
from mamlrun.engine import Learn2LearnEngine
from mamlrun.errors import UserError
from mamlrun.models import build_model
from mamlrun.tasks import SinusoidTasks

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

# Seeds of the held-out task sets, offsets from eval.seed: validation never sees test tasks.
VALIDATION_SEED_OFFSET = 1


def select_device(
    hardware: Hardware, key: str = "hardware.device", on_cpu: str = "hardware=cpu"
) -> torch.device:
    """The training device, set up as `hardware` says (threads, determinism, CUDA precision);
    refuses CUDA when there is none instead of failing later, naming the caller's option `key`
    and the `on_cpu` setting to use instead."""
    device = torch.device(hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"{key}={hardware.device}: CUDA is not available on this machine "
            f"(use {on_cpu}, or install a CUDA build of torch)"
        )
    if device.type == "cuda":
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise UserError(
                    f"{key}={hardware.device}: this machine has {torch.cuda.device_count()} CUDA "
                    "device(s), numbered from 0"
                )
            # make it the current device: CUDA streams and graph captures (meta_step) use that
            torch.cuda.set_device(device)
        set_cuda_precision(hardware.precision)
    keep_freed_memory()
    torch.set_num_threads(hardware.threads or len(os.sched_getaffinity(0)))
    torch.use_deterministic_algorithms(hardware.deterministic, warn_only=True)
    return device


# glibc's mallopt parameters (malloc.h) and the variables with which a user sets them himself.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the OS.

    Why: a meta-iteration allocates and frees tens of MB (Omniglot) to GBs (miniImageNet) of
    activations. glibc serves blocks above its mmap threshold with fresh `mmap`s and returns free
    memory at the top of its heap to the OS once more than its trim threshold is free; the
    thresholds adapt only up to 32 and 64 MB, so every iteration maps pages that the kernel must
    fault in and zero again. Measured on a 2-core CPU (vmap engine, second-order MAML): Omniglot
    5w1s ~10,000 page faults and 16 ms of kernel time per iteration, miniImageNet 5w1s (290 MB
    per layer) 790,000 faults and 1.5 s; with blocks up to 1 GB served from the heap and no
    trimming below 2 GB, about none, and 1.1x and 1.6x the iterations per second. The cost: the
    process keeps its peak heap (miniImageNet 5w1s: 4.3 GB resident instead of 3.5). Nothing is
    changed where the user set glibc's own variables (MALLOC_TRIM_THRESHOLD_,
    MALLOC_MMAP_THRESHOLD_, glibc.malloc tunables), or off glibc (another libc, or an allocator
    such as jemalloc preloaded, which mallopt does not reach).

    Returns whether the thresholds were set.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def set_cuda_precision(precision: str) -> None:
    """`hardware.precision` for CUDA float32 math (a process-wide switch).

    "fp32" is float32 throughout: PyTorch's default would let cuDNN use TF32 (10-bit mantissa) in
    convolutions, which the paper's float32 runs never did. "tf32" allows it in matmuls and
    convolutions.
    """
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_type(dataset: Any) -> str:
    return "regression" if isinstance(dataset, SinusoidDataset) else "classification"


@functools.lru_cache(maxsize=4)
def _split_images(name: str, root: str, download: bool, split_seed: int) -> dict[str, tuple]:
    """(images, classes) per split; read once per process (train, validation and test share it)."""
    from mamlrun import datasets  # imported on use: sinusoid runs need no image code

    if name == "omniglot":
        data = datasets.load_omniglot(Path(root).expanduser(), download=download)
        splits = datasets.omniglot_splits(len(data.images), split_seed=split_seed)
        return {split: (data.images, classes) for split, classes in splits.items()}
    result = {}
    for split in SPLIT_NAMES.values():
        images = datasets.load_miniimagenet(Path(root).expanduser(), split, download=download)
        result[split] = (images, list(range(len(images))))
    return result


def load_image_splits(dataset: ImageDataset) -> dict[str, tuple]:
    return _split_images(dataset.name, dataset.root, dataset.download, dataset.split_seed)


def task_sampler(
    dataset: Any, split: str, seed: int, shots: int | None = None, device: Any = "cpu"
):
    """A sampler of tasks of `split` ("train", "val", "test").

    Meta-training tasks have `dataset.shots` support and `dataset.query_shots` query examples.
    Held-out sinusoid tasks are scored on `eval_query_points` evenly spaced points over the whole
    x range, as the paper's evaluation; held-out classification tasks use `test_query_shots`.
    Training tasks are drawn on the training `device`; validation and test tasks on the CPU (the
    default), so they are the same tasks whatever hardware a run used.
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
            device=device,
        )
    from mamlrun.fewshot import ClassificationTasks, TensorClassificationTasks

    images, classes = load_image_splits(dataset)[SPLIT_NAMES[split]]
    options = dict(
        ways=dataset.ways,
        shots=shots or dataset.shots,
        query_shots=dataset.train_query_shots if split == "train" else dataset.eval_query_shots,
        rotations=dataset.rotations,
        seed=seed,
        split=SPLIT_NAMES[split],
    )
    if dataset.sampler == "tensor":
        return TensorClassificationTasks(images, classes, device=device, **options)
    return ClassificationTasks(images, classes, **options)


def eval_shots(dataset: Any, requested: list[int] | None) -> list[int]:
    """The K values evaluated: `eval.shots` if given, else the dataset's list (or its K)."""
    if requested:
        return list(requested)
    return list(getattr(dataset, "eval_shots", None) or [dataset.shots])


def setting_label(dataset: Any, shots: int) -> str:
    """How a test setting is named in eval.json and tables: `K=5` or `5-way 1-shot`."""
    if isinstance(dataset, SinusoidDataset):
        return f"K={shots}"
    return f"{dataset.ways}-way {shots}-shot"


def input_shape(dataset: Any) -> tuple[int, ...]:
    if isinstance(dataset, SinusoidDataset):
        return (1,)
    channels = 1 if dataset.name == "omniglot" else 3
    return (channels, dataset.image_size, dataset.image_size)


def model_for(model_cfg: Any, dataset: Any) -> nn.Module:
    """The configured model, with inputs and outputs sized for the dataset (outputs = ways)."""
    if isinstance(model_cfg, TargetModel):
        from hydra.errors import InstantiationException

        try:
            return hydra.utils.instantiate(model_cfg.spec)
        except InstantiationException as err:  # the class or its arguments: the cause says which
            cause = err.__cause__ or err
            raise UserError(
                f"model._target_: cannot build {model_cfg.name}: {type(cause).__name__}: "
                f"{error_line(cause)}"
            ) from None
    options = {k: v for k, v in vars(model_cfg).items() if k != "name"}
    outputs = 1 if isinstance(dataset, SinusoidDataset) else dataset.ways
    return build_model(model_cfg.name, input_shape(dataset), outputs, **options)


def engine_for(
    model: nn.Module, algorithm: Algorithm, dataset: Any, hardware: Hardware
) -> Learn2LearnEngine:
    """The engine chosen by `algorithm.engine`; both compute the same MAML updates."""
    if algorithm.name == "pretrain":  # trains differently, adapts at test exactly as MAML
        from mamlrun.pretrain import PretrainEngine

        return PretrainEngine(
            engine_for(model, dataclasses.replace(algorithm, name="maml"), dataset, hardware)
        )
    if algorithm.engine == "vmap":
        from mamlrun.vmap_engine import VmapEngine

        return VmapEngine(
            model,
            inner_lr=algorithm.inner_lr,
            first_order=algorithm.first_order,
            task_type=task_type(dataset),
            compile_kernels=hardware.compile,
        )
    return Learn2LearnEngine(
        model,
        inner_lr=algorithm.inner_lr,
        first_order=algorithm.first_order,
        task_type=task_type(dataset),
    )


def meta_optimizer(model: nn.Module, algorithm: Algorithm) -> torch.optim.Optimizer:
    build = hydra.utils.instantiate(algorithm.meta_optimizer)
    return build(model.parameters(), lr=algorithm.meta_lr)
