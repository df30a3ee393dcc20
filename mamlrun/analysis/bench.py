"""`mamlrun bench`: meta-training throughput of mamlrun against learn2learn.

Each setting is an experiment preset (`SETTING_PRESETS`: `conf/experiment/finn2017/<preset>`):
its ways, shots, query shots, meta-batch size, inner steps, inner learning rate and model, all
second-order MAML. The contenders run in one process, interleaved (A, B, C, A, B, C, ...) so that
machine noise hits them alike, each timed over several repeats:

- `learn2learn example`: a stand-in for learn2learn's MAML examples on mamlrun's paper model: a
  learn2learn `Taskset` (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels, its
  RandomClassRotation) over the images in memory, or per-task NumPy sampling for sinusoid; per
  task `clone()`, `adapt()`, query loss, `backward()`; gradients divided by the meta-batch size;
  `Adam.step()`. Its ratio compares the engines on one model and one data source.
- `learn2learn maml_omniglot.py` (omniglot_5w1s, real Omniglot only): learn2learn's example
  script as shipped, its model and task pipeline included (`mamlrun.analysis.l2l_script`): what
  a user would run instead of mamlrun.
- `mamlrun learn2learn`: mamlrun's training step with `algorithm.engine=learn2learn`.
- `mamlrun vmap`: mamlrun's training step with `algorithm.engine=vmap`.
- with `ablation=true`, the same engine with one option flipped at a time (`ablation_rows`):
  `torch.func only` runs the model through `vmap` + `functional_call` instead of its written-out
  task-batched layers; where the batch-norm kernels are compiled (`compile=true`, the default on
  a CPU as in `conf/hardware/cpu.yaml`) `eager batch norm` does not compile them; on CUDA,
  `CUDA graph` / `no CUDA graph` flips `hardware.cuda_graphs`; `fp32`, `TF32` (CUDA only) and
  `bf16 autocast` run the other `hardware.precision` values: options kept only where they
  measurably help.

Omniglot uses the real images when found, else random images of the right shape; miniImageNet
uses random images (its images are not shipped). Results: median iterations/s and tasks/s with
min-max spread, the ratios to the stand-in and to the script, achieved GFLOP/s (the floating-point
operations of one meta-iteration, counted once by `torch.utils.flop_counter.FlopCounterMode` on
the reference engine, times each contender's iterations/s), and peak GPU memory; printed as a
table and written to `docs/benchmarks.md` after every repeat, so that a bench stopped by a time
limit keeps what it measured (a setting cut short says how many repeats it has). The default
vmap contender's tasks/s per preset go to `mamlrun/analysis/throughput.json`, which `mamlrun
reproduce --dry-run` reads for its time estimates.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from mamlrun import console
from mamlrun.analysis.l2l_script import SCRIPT_LABEL, script_data_root, script_step
from mamlrun.analysis.throughput import record_throughput
from mamlrun.config.compose import compose_config
from mamlrun.config.schema import Hardware, SinusoidDataset
from mamlrun.config.validate import hardware_defaults, validate
from mamlrun.data.facts import IMAGES_PER_CLASS, SPLIT_CLASSES
from mamlrun.data.fewshot import TensorClassificationTasks
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.l2l_engine import Learn2LearnEngine, import_learn2learn
from mamlrun.maml.step import WARMUP_STEPS, MetaStep
from mamlrun.run.build import model_for
from mamlrun.run.runtime import cpu_model, select_device, set_cuda_precision

T = TypeVar("T")

_DOC_HEADER = """# Benchmarks

Meta-training throughput, written by `mamlrun bench` (see `mamlrun/analysis/bench.py` for what each
contender runs). `× learn2learn example` is the ratio to the stand-in loop (learn2learn's
`clone()`/`adapt()` per task on mamlrun's paper model and data), `× maml_omniglot.py` the ratio to
learn2learn's `examples/vision/maml_omniglot.py` as shipped (its `OmniglotCNN` and task pipeline;
Omniglot 5-way 1-shot on the real data only), both measured in the same process. `GFLOP/it` is the
floating-point operations of one meta-iteration, counted once per setting by PyTorch's
`FlopCounterMode` on the reference engine (mamlrun's learn2learn step on the paper's model; the
script's row on its own model); `GFLOP/s` is that count times the row's median iterations/s.
"""

# bench setting (the name users type) -> experiment preset under conf/experiment/finn2017/
SETTING_PRESETS = {
    "sinusoid": "sinusoid_maml",
    "omniglot_5w1s": "omniglot_5w1s",
    "omniglot_20w1s": "omniglot_20w1s",
    "miniimagenet_5w1s": "miniimagenet_5w1s",
}
SCRIPT_SETTINGS = ("omniglot_5w1s",)  # what learn2learn's maml_omniglot.py runs
CONTENDERS = ("learn2learn example", "mamlrun learn2learn", "mamlrun vmap")
ABLATION_VMAP = "mamlrun vmap, torch.func only"
ABLATION_EAGER = "mamlrun vmap, eager batch norm"
PRECISION_LABELS = {"fp32": "fp32", "tf32": "TF32", "bf16": "bf16 autocast"}


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: a preset's task shape, MAML hyperparameters and model."""

    name: str
    preset: str
    ways: int  # 0 for regression
    shots: int
    query_shots: int
    meta_batch_size: int
    inner_steps: int
    inner_lr: float
    dataset: Any = field(repr=False)  # the preset's typed dataset section
    model_cfg: Any = field(repr=False)

    @property
    def regression(self) -> bool:
        return self.ways == 0

    @property
    def omniglot(self) -> bool:
        return not self.regression and self.dataset.name == "omniglot"

    @property
    def rotations(self) -> bool:
        return not self.regression and self.dataset.rotations

    def model(self) -> torch.nn.Module:
        return model_for(self.model_cfg, self.dataset)


def _preset_sections(preset: str) -> tuple[Any, Any, Any]:
    """(dataset, model, algorithm) sections of the validated preset: the one place that reads
    `validate`'s result."""
    config = validate(compose_config([f"experiment=finn2017/{preset}"]))
    return config.dataset, config.model, config.algorithm


def bench_setting(name: str) -> Setting:
    """The bench setting `name` as its preset composes it."""
    preset = SETTING_PRESETS[name]
    dataset, model_cfg, algorithm = _preset_sections(preset)
    regression = isinstance(dataset, SinusoidDataset)
    return Setting(
        name=name,
        preset=preset,
        ways=0 if regression else dataset.ways,
        shots=dataset.shots,
        query_shots=dataset.query_shots if regression else dataset.train_query_shots,
        meta_batch_size=algorithm.meta_batch_size,
        inner_steps=algorithm.inner_steps,
        inner_lr=algorithm.inner_lr,
        dataset=dataset,
        model_cfg=model_cfg,
    )


@dataclass(frozen=True)
class BenchOptions:
    """`mamlrun bench`'s options, parsed (`mamlrun.cli.bench`); `command` is the line as given."""

    settings: tuple[str, ...] = tuple(SETTING_PRESETS)
    repeats: int = 5
    seconds: float = 3.0
    device: str = "cpu"
    threads: int = 0
    output: str = "docs/benchmarks.md"
    omniglot_root: str = ""
    ablation: bool = False
    compile: str = "auto"  # auto, true or false
    cuda_graphs: str = "auto"
    precision: str = "auto"  # auto or a key of PRECISION_LABELS
    throughput: Path | None = None  # None: write none
    command: str = "mamlrun bench"


@dataclass(frozen=True)
class VmapOptions:
    """How the vmap engine's step runs: the `hardware` options that change its speed."""

    batching: str = "layers"  # or "vmap": torch.func only
    compile_kernels: bool = False  # hardware.compile
    cuda_graph: bool = False  # hardware.cuda_graphs
    precision: str = "fp32"  # hardware.precision


def ablation_rows(default: VmapOptions, device: torch.device) -> dict[str, VmapOptions]:
    """The default vmap step with one option flipped per row, labelled by what the row runs."""
    rows = {ABLATION_VMAP: replace(default, batching="vmap")}
    if default.compile_kernels:
        rows[ABLATION_EAGER] = replace(default, compile_kernels=False)
    if device.type == "cuda":
        graph = "mamlrun vmap, no CUDA graph" if default.cuda_graph else "mamlrun vmap, CUDA graph"
        rows[graph] = replace(default, cuda_graph=not default.cuda_graph)
    for precision, label in PRECISION_LABELS.items():
        if precision != default.precision and (precision != "tf32" or device.type == "cuda"):
            rows[f"mamlrun vmap, {label}"] = replace(default, precision=precision)
    return rows


@dataclass
class Images:
    """A setting's images: uint8 [classes, per class, C, H, W] (None for sinusoid), where they
    came from, and the Omniglot folder they were read from (None: not the real Omniglot)."""

    tensor: torch.Tensor | None
    source: str
    real_root: Path | None = None


def _images(setting: Setting, omniglot_root: Path | None, required: bool) -> Images:
    """The setting's images. Omniglot's are the real ones where `omniglot_root` holds them. Where
    it does not, a root the user named (`required`) is an error: a typo must not benchmark random
    images unnoticed; the default root ($MAMLRUN_DATA) falls back to random images of the same
    shape, and says so."""
    if setting.regression:
        return Images(None, "sampled on the fly")
    generator = torch.Generator().manual_seed(0)
    if setting.omniglot:
        if omniglot_root is not None:
            from mamlrun.data.omniglot import load_omniglot, omniglot_splits

            try:
                data = load_omniglot(omniglot_root)
                train = omniglot_splits(len(data.images))["train"]
                source = f"real Omniglot ({len(train)} training characters)"
                return Images(data.images[train].unsqueeze(2), source, omniglot_root)
            except UserError as err:
                if required:
                    problem = str(err).split(";")[0]  # its advice is for dataset.root
                    raise UserError(
                        f"omniglot_root={omniglot_root}: {problem}; name a folder with Omniglot's "
                        "two archives (mamlrun data prepare dataset=omniglot downloads them)"
                    ) from None
                console.info(f"no Omniglot under {omniglot_root} ({err}): random images instead")
        classes, per_class, channels = (
            SPLIT_CLASSES["omniglot"]["train"],
            IMAGES_PER_CLASS["omniglot"],
            1,
        )
    else:
        # 600 images per class in the real data; 60 keep this benchmark's memory small and do
        # not change the cost of a training step.
        classes, per_class, channels = SPLIT_CLASSES["miniimagenet"]["train"], 60, 3
    size = setting.dataset.image_size
    shape = (classes, per_class, channels, size, size)
    colour = "" if channels == 1 else " RGB"
    source = f"random {size}x{size}{colour} images ({classes} classes x {per_class})"
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return Images(images, source)


def _stand_in_taskset(l2l, setting: Setting, images: torch.Tensor):
    """A learn2learn Taskset over the images in memory, as learn2learn's examples build one."""
    per_class = images.shape[1]
    dataset = l2l.data.MetaDataset(
        torch.utils.data.TensorDataset(
            images.flatten(0, 1), torch.arange(len(images)).repeat_interleave(per_class)
        )
    )
    transforms = [
        l2l.data.transforms.NWays(dataset, setting.ways),
        l2l.data.transforms.KShots(dataset, setting.shots + setting.query_shots),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ]
    if setting.rotations:
        rotation = l2l.vision.transforms.RandomClassRotation
        transforms.append(rotation(dataset, [0.0, 90.0, 180.0, 270.0]))
    return l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)


def _stand_in_tasks(l2l, setting: Setting, images, device) -> Callable[[], tuple]:
    """The stand-in's task source: (support x, support y, query x, query y) per call."""
    shots, k = setting.shots, setting.shots + setting.query_shots
    if setting.regression:
        rng = np.random.default_rng(0)

        def sinusoid_task():
            amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
            x = rng.uniform(-5, 5, (k, 1))
            y = amplitude * np.sin(x - phase)
            x, y = (torch.tensor(a, dtype=torch.float32, device=device) for a in (x, y))
            return x[:shots], y[:shots], x[shots:], y[shots:]

        return sinusoid_task
    taskset = _stand_in_taskset(l2l, setting, images)

    def image_task():
        x, y = taskset.sample()
        x, y = x.to(device).float().div_(255), y.to(device)
        # positional split as in learn2learn's examples: first `shots` of each class adapt
        support = torch.zeros(len(y), dtype=torch.bool)
        support[(torch.arange(setting.ways) * k)[:, None] + torch.arange(shots)] = True
        order = torch.argsort(y, stable=True).cpu()
        x, y = x[order], y[order]
        return x[support], y[support], x[~support], y[~support]

    return image_task


def _plain_learn2learn(setting: Setting, images, device) -> Callable[[], None]:
    """One meta-iteration of the stand-in loop, on mamlrun's paper model."""
    l2l = import_learn2learn()
    model = setting.model().to(device)
    maml = l2l.algorithms.MAML(model, lr=setting.inner_lr, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    loss_fn = F.mse_loss if setting.regression else F.cross_entropy
    next_task = _stand_in_tasks(l2l, setting, images, device)

    def step() -> None:
        optimizer.zero_grad()
        for _ in range(setting.meta_batch_size):
            support_x, support_y, query_x, query_y = next_task()
            learner = maml.clone()
            for _ in range(setting.inner_steps):
                learner.adapt(loss_fn(learner(support_x), support_y))
            loss_fn(learner(query_x), query_y).backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / setting.meta_batch_size)
        optimizer.step()

    return step


def _mamlrun_step(setting: Setting, images, device, vmap: VmapOptions | None) -> Callable[[], None]:
    """One meta-iteration of mamlrun's training loop (`MetaStep`, the tensor sampler), with the
    vmap engine run as `vmap` says, or with the learn2learn engine (None)."""
    model = setting.model().to(device)
    task_type = "regression" if setting.regression else "classification"
    if vmap is not None:
        from mamlrun.maml.vmap_engine import VmapEngine

        engine = VmapEngine(
            model,
            setting.inner_lr,
            first_order=False,
            task_type=task_type,
            batching=vmap.batching,
            compile_kernels=vmap.compile_kernels,
        )
    else:
        engine = Learn2LearnEngine(model, setting.inner_lr, first_order=False, task_type=task_type)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_step = MetaStep(
        engine,
        optimizer,
        cuda_graph=vmap is not None and vmap.cuda_graph,
        bf16=vmap is not None and vmap.precision == "bf16",
    )
    if setting.regression:
        sampler = SinusoidTasks(setting.shots, setting.query_shots, seed=0, device=device)
    else:
        sampler = TensorClassificationTasks(
            images,
            range(len(images)),
            setting.ways,
            setting.shots,
            setting.query_shots,
            rotations=setting.rotations,
            seed=0,
            device=device,
        )

    def step() -> None:
        batch = sampler.sample(setting.meta_batch_size)
        # as training does between logged iterations (the l2l example measures no "before")
        meta_step(batch, setting.inner_steps, measure_before=False)

    return step


def count_gflop(step: Callable[[], None]) -> float:
    """Floating-point operations of one call of `step`, in GFLOP, as PyTorch's FlopCounterMode
    counts them (matrix products and convolutions, their backward and double backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def _timed(step: Callable[[], None], seconds: float, device: torch.device) -> tuple[float, int]:
    """Iterations per second over at least `seconds` (and at least 2 iterations)."""
    done, started = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        step()
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started), done


def _tracking_peak_memory(
    run: Callable[[], T], device, memory: dict[str, float], contender: str
) -> T:
    """`run()`, keeping in `memory[contender]` the largest peak of allocated GPU MiB seen so far.

    Counted over the warm-up too, which captures the CUDA graph: a captured step's activations
    are allocated (from the graph's private pool) while it is captured, and replays reuse that
    pool without allocating, so the timed replays alone would count only the live tensors."""
    if device.type != "cuda":
        return run()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    memory[contender] = max(memory.get(contender, 0.0), peak)
    return result


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )


@dataclass(frozen=True)
class Plan:
    """What a bench measures, resolved from its options on this machine."""

    device: torch.device
    variants: dict[str, VmapOptions]  # "mamlrun vmap" (the default) and the ablation rows
    hardware: str
    omniglot_root: Path | None
    as_trained: bool  # the default contender runs as training does by default on this device


def _plan(options: BenchOptions) -> Plan:
    """The device and the vmap variants; options that need a CUDA device are refused here."""
    hardware = Hardware(
        name="bench", device=options.device, threads=options.threads, deterministic=False
    )
    device = select_device(hardware, key="device", on_cpu="device=cpu")
    # auto: as training runs by default on this device (conf/hardware/cpu.yaml, cuda.yaml)
    shipped = hardware_defaults(device.type)
    on_cuda = device.type == "cuda"

    def vmap_options(compile_kernels: str, cuda_graphs: str, precision: str) -> VmapOptions:
        graphs = shipped.cuda_graphs in (True, "auto") and on_cuda
        compiled = shipped.compile if compile_kernels == "auto" else compile_kernels == "true"
        return VmapOptions(
            compile_kernels=compiled,
            cuda_graph=graphs if cuda_graphs == "auto" else cuda_graphs == "true",
            precision=shipped.precision if precision == "auto" else precision,
        )

    default = vmap_options(options.compile, options.cuda_graphs, options.precision)
    for key, value, cuda_only in (
        ("cuda_graphs", options.cuda_graphs, default.cuda_graph),
        ("precision", options.precision, default.precision == "tf32"),
    ):
        if cuda_only and not on_cuda:
            raise UserError(f"{key}={value}: for CUDA devices only (add device=cuda)")
    variants = {"mamlrun vmap": default}
    if options.ablation:
        variants.update(ablation_rows(default, device))
    root = options.omniglot_root or os.environ.get("MAMLRUN_DATA")
    return Plan(
        device=device,
        variants=variants,
        hardware=hardware_description(device),
        omniglot_root=Path(root).expanduser() if root else None,
        as_trained=default == vmap_options("auto", "auto", "auto") and options.threads == 0,
    )


def _script_step(setting: Setting, images: Images, device) -> Callable[[], None] | None:
    """learn2learn's maml_omniglot.py meta-iteration where this setting is the script's and the
    real Omniglot is there (it reads the images from their files, not mamlrun's tensor)."""
    if setting.name not in SCRIPT_SETTINGS:
        return None
    data_root = script_data_root(images.real_root) if images.real_root else None
    if data_root is None:
        console.info(
            f"{setting.name}: no '{SCRIPT_LABEL}' row: the script reads the real Omniglot "
            "(name it with omniglot_root=)"
        )
        return None
    return script_step(data_root, device)


def _contenders(
    setting: Setting, images: Images, plan: Plan
) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """Each contender's step, in the table's order, and its GFLOP per meta-iteration: the
    reference engine's count for all that run the paper's model, the script's own for it."""
    device = plan.device
    steps = {CONTENDERS[0]: _plain_learn2learn(setting, images.tensor, device)}
    gflop: dict[str, float] = {}
    script = _script_step(setting, images, device)
    if script is not None:
        steps[SCRIPT_LABEL] = script
        gflop[SCRIPT_LABEL] = count_gflop(script)
    steps[CONTENDERS[1]] = _mamlrun_step(setting, images.tensor, device, None)
    reference = count_gflop(steps[CONTENDERS[1]])
    for label, variant in plan.variants.items():
        steps[label] = _mamlrun_step(setting, images.tensor, device, variant)
    return steps, {c: gflop.get(c, reference) for c in steps}


def _measure(
    setting: Setting,
    images: Images,
    plan: Plan,
    options: BenchOptions,
    earlier: list[dict],
) -> list[dict]:
    """Warm up, then time the contenders interleaved; the doc is rewritten after every repeat."""
    steps, gflop = _contenders(setting, images, plan)
    rates: dict[str, list[float]] = {c: [] for c in steps}
    memory: dict[str, float] = {}
    device, on_cuda = plan.device, plan.device.type == "cuda"
    default = plan.variants["mamlrun vmap"]

    def run(contender: str, action: Callable[[], T]) -> T:
        if on_cuda:  # a process-wide switch, set per contender
            set_cuda_precision(plan.variants.get(contender, default).precision)
        return _tracking_peak_memory(action, device, memory, contender)

    # warm-up: allocator, caches, lazy initialisation, compiling, CUDA graph capture
    for _ in range(WARMUP_STEPS + 2 if on_cuda else 1):
        for contender, step in steps.items():
            run(contender, step)
    for repeat in range(options.repeats):
        for contender, step in steps.items():
            rate, _ = run(contender, partial(_timed, step, options.seconds, device))
            rates[contender].append(rate)
        # after every repeat: a bench stopped by a time limit keeps what it measured
        summary = _summary(setting, images.source, rates, memory, gflop)
        _write_section(earlier + summary, plan.hardware, options)
        console.info(
            f"{setting.name}: repeat {repeat + 1}/{options.repeats} "
            + ", ".join(f"{c} {rates[c][-1]:.2f} it/s" for c in steps)
        )
    return summary


def _device_label(device: torch.device) -> str:
    """How reproduce's plan names the machine: "CPU", or the GPU's model ("H200")."""
    if device.type != "cuda":
        return "CPU"
    return torch.cuda.get_device_name(device).removeprefix("NVIDIA ").strip()


def run_bench(options: BenchOptions) -> None:
    """Measure every setting of `options`, print the table, write the doc and throughput file."""
    plan = _plan(options)
    console.info(f"benchmarking on {plan.hardware}")
    record = options.throughput is not None and plan.as_trained
    if options.throughput is not None and not plan.as_trained:
        console.info(
            f"not writing {options.throughput}: its rates are for the default vmap step "
            "(threads=0, compile, cuda_graphs and precision auto)"
        )
    results: list[dict] = []
    for name in options.settings:
        setting = bench_setting(name)
        images = _images(setting, plan.omniglot_root, bool(options.omniglot_root))
        summary = _measure(setting, images, plan, options, results)
        results += summary
        if record:
            vmap = next(r for r in summary if r["contender"] == "mamlrun vmap")
            rate = {setting.preset: vmap["tasks_s"]}
            label = _device_label(plan.device)
            record_throughput(
                options.throughput, plan.device.type, label, rate, plan.hardware, options.command
            )
    console.print_table(
        f"Meta-training throughput, second-order MAML ({plan.hardware})",
        COLUMNS,
        _table_rows(results, options.repeats),
    )
    if options.output:
        console.info(f"wrote {options.output}")
    if record:
        console.info(f"wrote the mamlrun vmap tasks/s to {options.throughput}")


def _summary(
    setting: Setting,
    source: str,
    rates: dict[str, list[float]],
    memory: dict[str, float],
    gflop: dict[str, float],
) -> list[dict]:
    """One result per contender: median and spread of its repeats, ratios to the baselines."""
    baseline = statistics.median(rates[CONTENDERS[0]])
    script = statistics.median(rates[SCRIPT_LABEL]) if rates.get(SCRIPT_LABEL) else None
    results = []
    for contender, measured in rates.items():
        median = statistics.median(measured)
        results.append(
            {
                "setting": setting.name,
                "contender": contender,
                "data": source,
                "repeats": len(measured),
                "it_s": median,
                "min": min(measured),
                "max": max(measured),
                "tasks_s": median * setting.meta_batch_size,
                "ratio": median / baseline,
                "script_ratio": None if script is None else median / script,
                "gflop": gflop[contender],
                "gflop_s": gflop[contender] * median,
                "peak_mib": memory.get(contender),
            }
        )
    return results


COLUMNS = [
    "setting",
    "contender",
    "it/s (median)",
    "min-max",
    "tasks/s",
    "× learn2learn example",
    "× maml_omniglot.py",
    "GFLOP/it",
    "GFLOP/s",
    "peak GPU MiB",
]


def _significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, without an exponent."""
    if value <= 0:
        return "0"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(value)))}f}"


def _table_rows(results: list[dict], repeats: int) -> list[list[str]]:
    """Table cells; a setting cut short (a time limit) says how many repeats it has."""
    return [
        [
            r["setting"]
            + ("" if r["repeats"] == repeats else f" ({r['repeats']} of {repeats} repeats)"),
            r["contender"],
            f"{r['it_s']:.2f}",
            f"{r['min']:.2f}-{r['max']:.2f}",
            f"{r['tasks_s']:.1f}",
            f"{r['ratio']:.1f}×",
            "-" if r["script_ratio"] is None else f"{r['script_ratio']:.1f}×",
            _significant(r["gflop"], 4),
            _significant(r["gflop_s"]),
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
        ]
        for r in results
    ]


def _write_section(results: list[dict], hardware: str, options: BenchOptions) -> None:
    """Replace this hardware's section of the output file (none when output is empty)."""
    if not options.output:
        return
    lines = [
        f"## {hardware}",
        "",
        f"`{options.command}` ({time.strftime('%Y-%m-%d')}; {options.repeats} interleaved repeats "
        f"of at least {options.seconds:g} s each; median, min-max).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in _table_rows(results, options.repeats)),
        "",
        "Data: " + "; ".join(sorted({f"{r['setting']}: {r['data']}" for r in results})) + ".",
        "",
    ]
    path = Path(options.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else _DOC_HEADER
    # One section per hardware: a rerun on the same hardware replaces its section.
    sections = text.split("\n## ")
    kept = [sections[0].rstrip("\n")] + [
        "## " + s.rstrip("\n") for s in sections[1:] if not s.startswith(hardware)
    ]
    path.write_text("\n\n".join([*kept, "\n".join(lines)]))
