"""Build the parts of a run (device, task samplers, model, engine, optimizer) from typed config.

The one place where config sections become objects, shared by training and evaluation, so both
always build a run the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from torch import nn

from mamlrun.config.compose import error_line
from mamlrun.config.schema import (
    Algorithm,
    FolderDataset,
    Hardware,
    ImageDataset,
    SinusoidDataset,
    TargetModel,
)
from mamlrun.data.class_images import ClassImages
from mamlrun.data.folder import FolderListing, check_tasks, load_folder, scan_folder
from mamlrun.data.preprocess import Preprocessing
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.engine import Engine
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import build_model

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

# Seeds of the held-out task sets, offsets from eval.seed: validation never sees test tasks.
VALIDATION_SEED_OFFSET = 1


def task_type(dataset: Any) -> str:
    return "regression" if isinstance(dataset, SinusoidDataset) else "classification"


@functools.lru_cache(maxsize=4)
def _folder_listing(root: str, splits: tuple, split_seed: int) -> FolderListing:
    """A folder dataset's files per split and class; listed once per process (checked before
    the run starts, then loaded)."""
    return scan_folder(root, dict(splits), split_seed)


@functools.lru_cache(maxsize=4)
def _split_images(
    name: str, root: str, download: bool, split_seed: int, folder: tuple | None
) -> dict[str, tuple[ClassImages, list[int]]]:
    """(images, classes) per split; read once per process (train, validation and test share it)."""
    # imported on use: sinusoid runs need no image code
    from mamlrun.data.miniimagenet import load_miniimagenet
    from mamlrun.data.omniglot import load_omniglot, omniglot_splits

    if name == "omniglot":
        data = load_omniglot(Path(root).expanduser(), download=download)
        images = ClassImages.grouped(data.images, data.characters)
        splits = omniglot_splits(len(data.images), split_seed=split_seed)
        return {split: (images, classes.tolist()) for split, classes in splits.items()}
    if name == "folder":
        preprocessing, splits = folder
        loaded = load_folder(_folder_listing(root, splits, split_seed), preprocessing)
        return {split: (images, list(range(len(images)))) for split, images in loaded.items()}
    result = {}
    for split in SPLIT_NAMES.values():
        images = ClassImages.grouped(load_miniimagenet(Path(root).expanduser(), split, download))
        result[split] = (images, list(range(len(images))))
    return result


def _folder_key(dataset: ImageDataset) -> tuple | None:
    if not isinstance(dataset, FolderDataset):
        return None
    return preprocessing_for(dataset), _splits_key(dataset)


def _splits_key(dataset: FolderDataset) -> tuple:
    return tuple(sorted(dataset.splits.items()))


def load_image_splits(dataset: ImageDataset) -> dict[str, tuple[ClassImages, list[int]]]:
    key = (dataset.name, dataset.root, dataset.download, dataset.split_seed, _folder_key(dataset))
    return _split_images(*key)


def check_image_files(dataset: Any) -> None:
    """What can be known of a folder dataset's files before any work: its classes per split and
    images per class against the task shape (`mamlrun.data.folder.check_tasks`). Listing only;
    the paper's datasets are checked by their facts in `validate`.

    Raises:
        UserError: naming the folder and the key to change.
    """
    if isinstance(dataset, FolderDataset):
        listing = _folder_listing(dataset.root, _splits_key(dataset), dataset.split_seed)
        check_tasks(
            listing,
            dataset.ways,
            dataset.shots,
            dataset.train_query_shots,
            dataset.eval_query_shots,
        )


def preprocessing_for(dataset: Any) -> Preprocessing | None:
    """How the dataset's image files become inputs (None for sinusoid): saved in checkpoints
    so that `mamlrun adapt` prepares a user's images the same way."""
    if isinstance(dataset, FolderDataset):
        return Preprocessing(dataset.image_size, dataset.channels, dataset.invert)
    if isinstance(dataset, ImageDataset):
        from mamlrun.data.miniimagenet import MINI_PREPROCESSING
        from mamlrun.data.omniglot import OMNIGLOT_PREPROCESSING

        return OMNIGLOT_PREPROCESSING if dataset.name == "omniglot" else MINI_PREPROCESSING
    return None


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
    from mamlrun.data.fewshot import ClassificationTasks, TensorClassificationTasks

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
    return list(dataset.eval_shots) if isinstance(dataset, SinusoidDataset) else [dataset.shots]


def setting_label(dataset: Any, shots: int) -> str:
    """How a test setting is named in eval.json and tables: `K=5` or `5-way 1-shot`."""
    if isinstance(dataset, SinusoidDataset):
        return f"K={shots}"
    return f"{dataset.ways}-way {shots}-shot"


def input_shape(dataset: Any) -> tuple[int, ...]:
    if isinstance(dataset, SinusoidDataset):
        return (1,)
    preprocessing = preprocessing_for(dataset)
    return (preprocessing.channels, preprocessing.size, preprocessing.size)


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


def refuse_untrusted_targets(
    checkpoint_config: dict[str, Any], trusted: bool, source: Path
) -> None:
    """Refuse a checkpoint whose config names a class to build, unless the user trusts it.

    A checkpoint is data, but a `_target_` in its config is code: Hydra imports the module it
    names and calls the class, so a shared file could run any importable callable as soon as
    `mamlrun eval` or `mamlrun train resume=` builds its model. A class named on the command line
    is the user's own choice (a new run with `model._target_=...` needs nothing more); one named
    by a file is not. So without `trust_model_target=true` on the command line, a checkpoint may
    name only the optimizers of `torch.optim` (`algorithm.meta_optimizer`, checked without
    importing anything); any other `_target_` is refused before anything is imported or built.
    The flag is read from the command line only, never from the checkpoint's own config.

    Raises:
        UserError: naming the file, the key and the class, and the key that allows it.
    """
    if trusted:
        return
    for where, target in _targets(checkpoint_config, ""):
        if where == "algorithm.meta_optimizer" and _is_torch_optimizer(target):
            continue
        raise UserError(
            f"{source}: its config builds {where}._target_={target!r}, a class named by the "
            "checkpoint file; add trust_model_target=true to build it (only for a checkpoint "
            "you trust)"
        )


def load_trained(checkpoint: str | Path, trusted: bool) -> tuple[Path, dict[str, Any], Any]:
    """(the checkpoint file, its payload, its validated RunConfig) for a run directory or a .pt.

    Raises:
        UserError: nothing loadable there, not a mamlrun checkpoint, or a `_target_` the user
            has not trusted (`refuse_untrusted_targets`).
    """
    from omegaconf import OmegaConf

    from mamlrun.config.validate import validate
    from mamlrun.run import rundir

    path = rundir.resolve(checkpoint)
    payload = rundir.load(path)
    refuse_untrusted_targets(payload["config"], trusted, path)
    return path, payload, validate(OmegaConf.create(payload["config"]), primary="train")


def _targets(node: Any, where: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of every `_target_` in a plain config."""
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((where, node["_target_"]))
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _targets(value, f"{where}.{index}")
    return found


def _is_torch_optimizer(target: Any) -> bool:
    """`torch.optim.<Name>` naming an optimizer class (looked up, not imported)."""
    prefix = "torch.optim."
    if not isinstance(target, str) or not target.startswith(prefix):
        return False
    found = getattr(torch.optim, target[len(prefix) :], None)
    return isinstance(found, type) and issubclass(found, torch.optim.Optimizer)


def engine_for(model: nn.Module, algorithm: Algorithm, dataset: Any, hardware: Hardware) -> Engine:
    """The engine chosen by `algorithm.engine`; both compute the same MAML updates."""
    if algorithm.name == "pretrain":  # trains differently, adapts at test exactly as MAML
        from mamlrun.maml.pretrain import PretrainEngine

        return PretrainEngine(
            engine_for(model, dataclasses.replace(algorithm, name="maml"), dataset, hardware)
        )
    if algorithm.engine == "vmap":
        from mamlrun.maml.vmap_engine import VmapEngine

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
