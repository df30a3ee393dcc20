"""`validate(cfg)`: the composed config checked, before any work starts, into typed sections.

A wrong type, an unknown key added with `+key=...`, a negative learning rate or an impossible task
shape fails in one line that names the key, before data is loaded or a run directory is filled.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mamlrun.config.compose import _shipped_configs
from mamlrun.config.schema import (
    DEVICE_PATTERN,
    ENGINES,
    GROUPS,
    PRECISIONS,
    TOP_LEVEL,
    Algorithm,
    Conv4Model,
    EvalConfig,
    EvalSettings,
    FolderDataset,
    Hardware,
    ImageDataset,
    MLPModel,
    RunConfig,
    SinusoidDataset,
    TargetModel,
    TrainLoop,
    WandbLogger,
)
from mamlrun.data.facts import IMAGE_SIZES, IMAGES_PER_CLASS, SPLIT_CLASSES
from mamlrun.data.folder import SPLITS, is_fraction
from mamlrun.errors import ConfigError

# Image sides a folder dataset may be resized to: the conv4 models pool four times.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512


def hardware_defaults(device_type: str) -> Hardware:
    """The shipped `hardware=<device_type>` group (conf/hardware/cpu.yaml, cuda.yaml): how
    training runs by default on that device type; the schema's defaults for other types."""
    path = _shipped_configs() / "hardware" / f"{device_type}.yaml"
    if not path.is_file():
        return Hardware(name=device_type, device=device_type)
    return _typed("hardware", OmegaConf.create(path.read_text()), Hardware)


def _typed(path: str, node: Any, schema: type) -> Any:
    """Merge `node` onto `schema`: refuses unknown keys and values of the wrong type."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys, got {node!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        where = f"{path}.{key}" if key else path
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{where}: {reason}") from None


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_range(key: str, value: list[float], low: float | None = None) -> None:
    _check(len(value) == 2 and value[0] <= value[1], key, f"expected [low, high], got {value}")
    if low is not None:
        _check(value[0] >= low, key, f"must be >= {low}, got {value}")


def validate(cfg: DictConfig, primary: str = "train") -> RunConfig | EvalConfig:
    """Check a composed `train` (or `eval`) config; return it as typed sections.

    Raises:
        ConfigError: one line naming the offending key and what to do.
    """
    _refuse_unknown_keys(cfg, primary)
    sections = _group_sections(cfg, primary) | _top_level_sections(cfg, primary)
    _check_values(sections)
    if primary == "eval":
        return EvalConfig(**sections)
    loop, budget = sections["train"], sections["budget"]
    if loop.iterations and budget < 1:
        # The one place `budget` acts: a fraction of the configured iterations (at least 1).
        sections["train"] = replace(loop, iterations=max(1, round(loop.iterations * budget)))
    return RunConfig(**sections)


# Top-level keys added after runs were already saved: their value in a config without them.
OLDER_RUNS_DEFAULTS: dict[str, Any] = {"budget": 1.0, "trust_model_target": False}


def _refuse_unknown_keys(cfg: DictConfig, primary: str) -> None:
    allowed = set(TOP_LEVEL[primary]) | set(GROUPS) | {"hydra"}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown key (remove it, or check its spelling)")


def _group_sections(cfg: DictConfig, primary: str) -> dict[str, Any]:
    """Each config group's node typed by the schema its `name:` picks (a `model` node with a
    `_target_` is any `nn.Module`). `eval` has only the groups it composes (hardware, logger)."""
    sections: dict[str, Any] = {}
    for group in (g for g in GROUPS if g in cfg or primary == "train"):
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"{group}: missing; choose one of {sorted(GROUPS[group])}")
        if group == "model" and isinstance(node, DictConfig) and "_target_" in node:
            spec = OmegaConf.to_container(node, resolve=True)
            spec.pop("name", None)
            sections[group] = TargetModel(spec=spec)
            continue
        name = node.get("name") if isinstance(node, DictConfig) else None
        registry = GROUPS[group]
        if name not in registry:
            raise ConfigError(
                f"{group}.name: unknown {group} {name!r} (choices: {sorted(registry)})"
            )
        for key in node:
            if OmegaConf.is_missing(node, key):
                raise ConfigError(f"{group}.{key}: required; pass {group}.{key}=<value>")
        sections[group] = _typed(group, node, registry[name])
    return sections


def _top_level_sections(cfg: DictConfig, primary: str) -> dict[str, Any]:
    """The primary config's own keys: dataclass sections (`train`, `eval`, `paper`) and values."""
    sections: dict[str, Any] = {}
    for key, kind in TOP_LEVEL[primary].items():
        if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
            if key == "paper" and cfg.get(key) is None:
                sections[key] = None  # only presets carry a paper reference
                continue
            sections[key] = _typed(key, cfg.get(key), kind)
            continue
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}: required; pass {key}=<value> on the command line")
        value = cfg.get(key, OLDER_RUNS_DEFAULTS.get(key))  # keys older runs' configs lack
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise ConfigError(f"{key}: expected {_kind_name(kind)}, got {value!r}")
        sections[key] = value
    return sections


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check_values(sections: dict[str, Any]) -> None:
    """Value checks the types alone cannot express: one small check per section, in this order
    (the first problem found is the one reported)."""
    algorithm, dataset, model = (sections.get(k) for k in ("algorithm", "dataset", "model"))
    hardware, logger = sections.get("hardware"), sections.get("logger")
    if algorithm is not None:
        _check_algorithm(algorithm)
    if isinstance(dataset, SinusoidDataset):
        _check_sinusoid(dataset)
    if isinstance(dataset, ImageDataset):
        _check_image_dataset(dataset)
    if model is not None:
        _check_model(model, dataset)
    if "budget" in sections:
        budget = sections["budget"]
        ok = not isinstance(budget, bool) and 0 < budget <= 1
        _check(ok, "budget", f"must be > 0 and <= 1, got {budget}")
    if isinstance(sections.get("train"), TrainLoop):
        _check_train_loop(sections["train"])
    if isinstance(sections.get("eval"), EvalSettings):
        _check_eval(sections["eval"])
    _check_seeds(sections.get("seed"), getattr(dataset, "split_seed", None))
    if hardware is not None:
        _check_hardware(hardware, algorithm)
    if isinstance(logger, WandbLogger):
        _check(
            logger.mode in ("offline", "online", "disabled"),
            "logger.mode",
            f"choose offline, online or disabled, got {logger.mode!r}",
        )


def _check_algorithm(algorithm: Algorithm) -> None:
    _check(algorithm.inner_lr >= 0, "algorithm.inner_lr", f"must be >= 0, got {algorithm.inner_lr}")
    _check(algorithm.meta_lr > 0, "algorithm.meta_lr", f"must be > 0, got {algorithm.meta_lr}")
    for key in ("inner_steps", "test_inner_steps"):
        value = getattr(algorithm, key)
        _check(value >= 0, f"algorithm.{key}", f"must be >= 0, got {value}")
    _check(
        algorithm.meta_batch_size >= 1,
        "algorithm.meta_batch_size",
        f"must be >= 1, got {algorithm.meta_batch_size}",
    )
    if algorithm.grad_clip is not None:
        _check(algorithm.grad_clip > 0, "algorithm.grad_clip", "must be > 0 or null")
    _check_optimizer(algorithm.meta_optimizer, algorithm.meta_lr)
    _check(
        algorithm.engine in ENGINES,
        "algorithm.engine",
        f"choose one of {', '.join(ENGINES)}, got {algorithm.engine!r}",
    )


def _check_sinusoid(dataset: SinusoidDataset) -> None:
    _check_range("dataset.amplitude", dataset.amplitude)
    _check_range("dataset.phase", dataset.phase)
    _check_range("dataset.x_range", dataset.x_range)
    _check(dataset.shots >= 1, "dataset.shots", f"must be >= 1, got {dataset.shots}")
    _check(
        dataset.query_shots >= 1, "dataset.query_shots", f"must be >= 1, got {dataset.query_shots}"
    )
    _check(
        len(dataset.eval_shots) > 0 and min(dataset.eval_shots) >= 1,
        "dataset.eval_shots",
        f"must be a non-empty list of K >= 1, got {dataset.eval_shots}",
    )
    _check(dataset.eval_query_points >= 1, "dataset.eval_query_points", "must be >= 1")


def _check_model(model: Any, dataset: Any) -> None:
    if isinstance(model, Conv4Model):
        _check(model.filters >= 1, "model.filters", f"must be >= 1, got {model.filters}")
        _check(model.pooling in ("stride", "max"), "model.pooling", "choose stride or max")
        _check(model.head in ("mean", "flatten"), "model.head", "choose mean or flatten")
        _check(model.init in ("authors", "torch"), "model.init", "choose authors or torch")
        _check(
            model.head_init in ("normal", "xavier"), "model.head_init", "choose normal or xavier"
        )
    if dataset is not None:
        _check(
            not (isinstance(dataset, SinusoidDataset) and isinstance(model, Conv4Model)),
            "model",
            f"model {model.name!r} needs an image dataset; for sinusoid use model=mlp",
        )
    if isinstance(model, MLPModel):
        _check(
            all(h >= 1 for h in model.hidden),
            "model.hidden",
            f"sizes must be >= 1, got {model.hidden}",
        )
        _check(
            model.activation in ("relu", "tanh"),
            "model.activation",
            f"choose relu or tanh, got {model.activation!r}",
        )
        _check(
            model.init in ("authors", "torch"),
            "model.init",
            f"choose authors or torch, got {model.init!r}",
        )


def _check_train_loop(train: TrainLoop) -> None:
    _check(train.iterations >= 0, "train.iterations", f"must be >= 0, got {train.iterations}")
    for key in ("log_every", "val_every", "val_tasks", "checkpoint_every"):
        value = getattr(train, key)
        _check(value >= 1, f"train.{key}", f"must be >= 1, got {value}")
    _check(
        train.on_nonfinite in ("stop", "skip"),
        "train.on_nonfinite",
        f"choose stop or skip, got {train.on_nonfinite!r}",
    )


def _check_eval(evaluation: EvalSettings) -> None:
    _check(evaluation.tasks >= 2, "eval.tasks", f"must be >= 2 for a CI, got {evaluation.tasks}")
    _check(evaluation.plot_tasks >= 0, "eval.plot_tasks", "must be >= 0")
    if evaluation.inner_steps is not None:
        _check(evaluation.inner_steps >= 0, "eval.inner_steps", "must be >= 0 or null")
    if evaluation.shots is not None:
        _check(
            len(evaluation.shots) > 0 and min(evaluation.shots) >= 1,
            "eval.shots",
            f"must be a non-empty list of K >= 1 or null, got {evaluation.shots}",
        )


def _check_seeds(seed: int | None, split_seed: int | None) -> None:
    """NumPy's and PyTorch's seeds are unsigned 32-bit."""
    for key, value in (("seed", seed), ("dataset.split_seed", split_seed)):
        if value is not None:
            _check(0 <= value < 2**32, key, f"must be in [0, 2**32), got {value}")


def _check_hardware(hardware: Hardware, algorithm: Algorithm | None) -> None:
    _check(
        DEVICE_PATTERN.fullmatch(hardware.device) is not None,
        "hardware.device",
        f"choose cpu, cuda or cuda:N, got {hardware.device!r}",
    )
    _check(
        hardware.threads >= 0,
        "hardware.threads",
        f"must be >= 1, or 0 for all cores, got {hardware.threads}",
    )
    _check_cuda_options(hardware, algorithm)


def _check_cuda_options(hardware: Hardware, algorithm: Algorithm | None) -> None:
    """`hardware.precision=tf32` and `hardware.cuda_graphs` exist for CUDA devices only."""
    _check(
        hardware.precision in PRECISIONS,
        "hardware.precision",
        f"choose one of {', '.join(PRECISIONS)}, got {hardware.precision!r}",
    )
    on_cuda = hardware.device.startswith("cuda")
    _check(
        hardware.precision != "tf32" or on_cuda,
        "hardware.precision",
        f"tf32 is for CUDA devices; use hardware.precision=fp32 (or bf16) on {hardware.device}",
    )
    _check(
        hardware.cuda_graphs in (True, False, "auto"),
        "hardware.cuda_graphs",
        f"choose true, false or auto, got {hardware.cuda_graphs!r}",
    )
    _check(
        hardware.cuda_graphs is not True or on_cuda,
        "hardware.cuda_graphs",
        f"CUDA graphs need a CUDA device; set hardware.cuda_graphs=false on {hardware.device}",
    )
    if hardware.cuda_graphs is True and algorithm is not None:
        obstacle = _capture_obstacle(algorithm)
        _check(obstacle is None, "hardware.cuda_graphs", f"{obstacle}; or set it to false")


def _capture_obstacle(algorithm: Algorithm) -> str | None:
    """Why the training step cannot be captured in a CUDA graph, or None where it can: the vmap
    engine's MAML or FOMAML step (not the learn2learn engine, which reads values on the host for
    every task, nor pretraining) with an optimizer whose step can run in a graph."""
    if algorithm.engine != "vmap" or algorithm.name == "pretrain":
        return "only the vmap engine's MAML step can be captured: use algorithm.engine=vmap"
    from mamlrun.maml.step import can_be_captured

    if not can_be_captured(_throwaway_optimizer(algorithm.meta_optimizer, algorithm.meta_lr)):
        return (
            f"{algorithm.meta_optimizer['_target_']} cannot be captured (it has no 'capturable' "
            "option): use torch.optim.Adam, AdamW or SGD as algorithm.meta_optimizer"
        )
    return None


def captures_cuda_graph(hardware: Hardware, algorithm: Algorithm) -> bool:
    """Whether training replays its step as a CUDA graph: `hardware.cuda_graphs=true` (validated
    to be possible), or `auto` where it is possible (a CUDA device, and a step and optimizer
    that can be captured); `auto` runs the others eagerly without complaint."""
    if hardware.cuda_graphs != "auto":
        return bool(hardware.cuda_graphs)
    return hardware.device.startswith("cuda") and _capture_obstacle(algorithm) is None


def _check_image_dataset(dataset: ImageDataset) -> None:
    """Task shapes the dataset's splits can serve, checked before any file is read."""
    name = dataset.name
    _check(
        dataset.ways >= 2,
        "dataset.ways",
        f"must be >= 2 (a task needs two classes), got {dataset.ways}",
    )
    _check(dataset.shots >= 1, "dataset.shots", f"must be >= 1, got {dataset.shots}")
    _check(
        dataset.sampler in ("tensor", "learn2learn"),
        "dataset.sampler",
        f"choose tensor or learn2learn, got {dataset.sampler!r}",
    )
    for key in ("query_shots", "test_query_shots"):
        value = getattr(dataset, key)
        _check(value is None or value >= 1, f"dataset.{key}", f"must be >= 1 or null, got {value}")
    if isinstance(dataset, FolderDataset):
        _check_folder(dataset)  # the folder's own classes and images: checked when it is listed
        return
    _check(
        dataset.image_size == IMAGE_SIZES[name],
        "dataset.image_size",
        f"{name} images are {IMAGE_SIZES[name]}x{IMAGE_SIZES[name]} (the paper's size)",
    )
    for split, classes in SPLIT_CLASSES[name].items():
        _check(
            dataset.ways <= classes,
            "dataset.ways",
            f"{dataset.ways} ways but the {name} {split} split has only {classes} classes",
        )
    per_class = IMAGES_PER_CLASS[name]
    _check(
        dataset.shots < per_class,
        "dataset.shots",
        f"must be < {per_class} ({name} has {per_class} images per class and a task needs "
        f"queries too), got {dataset.shots}",
    )
    for key, queries in (
        ("query_shots", dataset.train_query_shots),
        ("test_query_shots", dataset.eval_query_shots),
    ):
        _check(
            dataset.shots + queries <= per_class,
            f"dataset.{key}",
            f"dataset.shots + dataset.{key} = {dataset.shots + queries} but {name} has only "
            f"{per_class} images per class",
        )


def _check_folder(dataset: FolderDataset) -> None:
    _check(dataset.channels in (1, 3), "dataset.channels", "choose 1 (grayscale) or 3 (RGB)")
    _check(
        MIN_IMAGE_SIZE <= dataset.image_size <= MAX_IMAGE_SIZE,
        "dataset.image_size",
        f"must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {dataset.image_size}",
    )
    splits = dataset.splits
    _check(
        sorted(splits) == sorted(SPLITS),
        "dataset.splits",
        f"give train, validation and test, got {sorted(splits)}",
    )
    values = [splits[split] for split in SPLITS]
    counts = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    fractions = all(
        isinstance(v, int | float) and not isinstance(v, bool) and is_fraction(float(v))
        for v in values
    )
    _check(
        counts or (fractions and abs(sum(values) - 1) < 1e-6),
        "dataset.splits",
        f"give fractions of the classes in (0, 1) summing to 1, or class counts >= 1, got {splits}",
    )


def _check_optimizer(spec: dict[str, Any], lr: float) -> None:
    """Resolve the optimizer's `_target_`, bind its arguments, and build it for one throwaway
    parameter: its constructor checks the values (`betas=x`, a negative `weight_decay`)."""
    target = spec.get("_target_")
    _check(
        isinstance(target, str), "algorithm.meta_optimizer._target_", "must name a torch optimizer"
    )
    try:
        optimizer_class = hydra.utils.get_class(target)
    except Exception:  # noqa: BLE001 - Hydra raises several types; all mean "cannot import"
        raise ConfigError(
            f"algorithm.meta_optimizer._target_: cannot import {target!r} (e.g. torch.optim.Adam)"
        ) from None
    _check(
        spec.get("_partial_") is True,
        "algorithm.meta_optimizer._partial_",
        "must be true: mamlrun passes the parameters and algorithm.meta_lr itself",
    )
    kwargs = _optimizer_options(spec)
    try:
        inspect.signature(optimizer_class).bind(params=[], lr=1.0, **kwargs)
    except TypeError as err:
        raise ConfigError(f"algorithm.meta_optimizer: {err}") from None
    try:
        _throwaway_optimizer(spec, lr)
    except Exception as err:  # noqa: BLE001 - optimizers raise TypeError, ValueError, ...
        raise ConfigError(
            f"algorithm.meta_optimizer: {target} refused {kwargs or 'its defaults'} "
            f"with lr={lr}: {err}"
        ) from None


def _throwaway_optimizer(spec: dict[str, Any], lr: float) -> Any:
    """The configured optimizer for one throwaway parameter: what its constructor accepts and
    which options it has, known before any work."""
    import torch

    return hydra.utils.get_class(spec["_target_"])(
        [torch.zeros(1, requires_grad=True)], lr=lr, **_optimizer_options(spec)
    )


def _optimizer_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's own keyword arguments: the spec without Hydra's `_target_`/`_partial_`."""
    return {k: v for k, v in spec.items() if not k.startswith("_")}
