"""Typed schemas of every config group, and the registries that pick one by a group's `name:`.

Hydra composes plain YAML (struct mode already refuses `sed=3`); `mamlrun.config.validate` then
merges the composed config onto these dataclasses, so a wrong type or an unknown key fails in one
line. Adding a dataset, model or algorithm means adding a dataclass here and a YAML file in conf/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------------- schemas


@dataclass
class SinusoidDataset:
    name: str = "sinusoid"
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, 3.141592653589793])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    shots: int = 10
    query_shots: int = 10
    eval_shots: list[int] = field(default_factory=lambda: [5, 10, 20])
    eval_query_points: int = 100


@dataclass
class ImageDataset:
    """Omniglot and miniImageNet: N-way K-shot classification on in-memory images."""

    name: str = "omniglot"
    root: str = "~/.cache/mamlrun/data"
    download: bool = False
    ways: int = 5
    shots: int = 1
    query_shots: int | None = None
    test_query_shots: int | None = None
    rotations: bool = True
    split_seed: int = 1
    image_size: int = 28
    sampler: str = "tensor"

    @property
    def train_query_shots(self) -> int:
        return self.shots if self.query_shots is None else self.query_shots

    @property
    def eval_query_shots(self) -> int:
        return self.shots if self.test_query_shots is None else self.test_query_shots


@dataclass
class FolderDataset(ImageDataset):
    """A user's folder of class folders (`mamlrun.data.folder`): any size, grayscale or RGB."""

    name: str = "folder"
    root: str = "???"
    rotations: bool = False
    image_size: int = 84
    channels: int = 3  # 1: grayscale, 3: RGB
    invert: bool = False  # 255 - pixel: dark strokes on white paper become high values
    # train / validation / test: fractions of the classes (summing to 1) or class counts; unused
    # when the folder holds train/, val/ and test/ itself
    splits: dict[str, Any] = field(
        default_factory=lambda: {"train": 0.7, "validation": 0.1, "test": 0.2}
    )


@dataclass
class MLPModel:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    init: str = "authors"
    batch_norm: bool = False


@dataclass
class Conv4Model:
    name: str = "conv4"
    filters: int = 64
    pooling: str = "stride"
    head: str = "mean"
    init: str = "authors"
    head_init: str = "normal"


@dataclass
class TargetModel:
    """Any `nn.Module` named by `_target_` (model-agnostic): its other keys are its arguments."""

    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec["_target_"]


@dataclass
class Algorithm:
    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    test_inner_steps: int = 10
    first_order: bool = False
    meta_batch_size: int = 25
    meta_lr: float = 0.001
    meta_optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True}
    )
    grad_clip: float | None = None
    engine: str = "vmap"


ENGINES = ("vmap", "learn2learn")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class Hardware:
    name: str = "cpu"
    device: str = "cpu"
    threads: int = 0  # 0: all cores
    deterministic: bool = True
    compile: bool = False  # torch.compile the vmap engine's batch-norm kernels
    precision: str = "fp32"  # fp32; tf32 (CUDA); bf16 (autocast of the training steps)
    # replay the vmap engine's meta-training step as a CUDA graph: true, false, or auto (where
    # the step can be captured: a CUDA device and the vmap engine's MAML or FOMAML)
    cuda_graphs: bool | str = "auto"


@dataclass
class WandbLogger:
    name: str = "wandb"
    mode: str = "offline"
    project: str = "mamlrun"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class NoLogger:
    name: str = "none"


@dataclass
class TrainLoop:
    iterations: int = 70000
    log_every: int = 100
    val_every: int = 1000
    val_tasks: int = 100
    checkpoint_every: int = 1000
    eval_at_end: bool = True
    on_nonfinite: str = "stop"


@dataclass
class PaperReference:
    """The paper's number a preset reproduces (accuracy as a fraction; MSE as listed)."""

    table: str = ""
    cell: str = ""
    metric: str = "acc"
    value: Any = None
    ci95: Any = None
    steps: Any = None


@dataclass
class EvalSettings:
    tasks: int = 600
    seed: int = 1234
    plot_tasks: int = 3
    inner_steps: int | None = None
    shots: list[int] | None = None


@dataclass(frozen=True)
class RunConfig:
    """A validated `mamlrun train` config: one typed section per config group and top-level key.

    What `validate` returns; each function takes the sections it uses, not the whole config.
    """

    dataset: SinusoidDataset | ImageDataset | FolderDataset
    model: MLPModel | Conv4Model | TargetModel
    algorithm: Algorithm
    hardware: Hardware
    logger: WandbLogger | NoLogger
    task_name: str
    seed: int
    resume: str | None
    print_config: bool
    budget: float | int
    paper: PaperReference | None
    train: TrainLoop
    eval: EvalSettings
    trust_model_target: bool = False  # resume=: build classes the checkpoint's config names


@dataclass(frozen=True)
class EvalConfig:
    """A validated `mamlrun eval` config: how to run and score a checkpoint, which itself carries
    what was trained (dataset, model, algorithm)."""

    hardware: Hardware
    logger: WandbLogger | NoLogger
    task_name: str
    seed: int
    checkpoint: str
    data_root: str | None
    print_config: bool
    eval: EvalSettings
    trust_model_target: bool = False  # build classes the checkpoint's config names


DATASETS: dict[str, type] = {
    "sinusoid": SinusoidDataset,
    "omniglot": ImageDataset,
    "miniimagenet": ImageDataset,
    "folder": FolderDataset,
}
MODELS: dict[str, type] = {"mlp": MLPModel, "conv4": Conv4Model}
ALGORITHMS: dict[str, type] = {"maml": Algorithm, "fomaml": Algorithm, "pretrain": Algorithm}
HARDWARE: dict[str, type] = {"cpu": Hardware, "cuda": Hardware}
LOGGERS: dict[str, type] = {"wandb": WandbLogger, "none": NoLogger}

GROUPS: dict[str, dict[str, type]] = {
    "dataset": DATASETS,
    "model": MODELS,
    "algorithm": ALGORITHMS,
    "hardware": HARDWARE,
    "logger": LOGGERS,
}
# Top-level keys of each primary config, besides the groups and Hydra's own node.
TOP_LEVEL: dict[str, dict[str, Any]] = {
    "train": {
        "task_name": str,
        "seed": int,
        "resume": (str, type(None)),
        "print_config": bool,
        "budget": (float, int),
        "paper": PaperReference,
        "train": TrainLoop,
        "eval": EvalSettings,
        "trust_model_target": bool,
    },
    "eval": {
        "task_name": str,
        "seed": int,
        "checkpoint": str,
        "data_root": (str, type(None)),
        "print_config": bool,
        "eval": EvalSettings,
        "trust_model_target": bool,
    },
}


# The devices mamlrun trains on (`hardware.device`, `mamlrun bench device=`).
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
