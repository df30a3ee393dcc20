"""`mamlrun bench`: meta-training throughput of mamlrun against a plain learn2learn loop.

Three contenders per setting, run in one process, interleaved (A, B, C, A, B, C, ...) so that
machine noise hits them alike, each timed over several repeats:

- `learn2learn example`: the loop as learn2learn's own MAML examples write it: a learn2learn
  `Taskset` (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels, its RandomClassRotation)
  for images or per-task NumPy sampling for sinusoid; per task `clone()`, `adapt()`, query loss,
  `backward()`; gradients divided by the meta-batch size; `Adam.step()`.
- `mamlrun learn2learn`: mamlrun's training step with `algorithm.engine=learn2learn`.
- `mamlrun vmap`: mamlrun's training step with `algorithm.engine=vmap`.
- with `ablation=true`, the same engine with one option flipped at a time (`ablation_rows`):
  `torch.func only` runs the model through `vmap` + `functional_call` instead of its written-out
  task-batched layers; where the batch-norm kernels are compiled (`compile=true`, the default on
  a CPU as in `conf/hardware/cpu.yaml`) `eager batch norm` does not compile them; on CUDA,
  `CUDA graph` / `no CUDA graph` flips `hardware.cuda_graphs`; `fp32`, `TF32` (CUDA only) and
  `bf16 autocast` run the other `hardware.precision` values: options kept only where they
  measurably help.

All use the paper's settings (second-order MAML). Omniglot uses the real images when found, else
random images of the right shape; miniImageNet uses random images (its images are not shipped).
Results: median iterations/s and tasks/s with min-max spread, the ratio to the plain loop, and
peak GPU memory; printed as a table and written to `docs/benchmarks.md` after every repeat, so
that a bench stopped by a time limit keeps what it measured (a setting cut short says how many
repeats it has).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from mamlrun import console
from mamlrun.config.schema import DEVICE_PATTERN, Hardware
from mamlrun.config.validate import hardware_defaults
from mamlrun.data.fewshot import TensorClassificationTasks
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.l2l_engine import Learn2LearnEngine, import_learn2learn
from mamlrun.maml.models import conv4, mlp
from mamlrun.maml.step import WARMUP_STEPS, MetaStep
from mamlrun.run.runtime import select_device, set_cuda_precision

T = TypeVar("T")

_DOC_HEADER = """# Benchmarks

Meta-training throughput, written by `mamlrun bench` (see `mamlrun/analysis/bench.py` for what each
contender runs). Ratios are to the plain learn2learn loop measured in the same process.
"""


@dataclass
class Setting:
    """One benchmark setting: the paper's hyperparameters for a table cell."""

    name: str
    ways: int  # 0 for regression
    shots: int
    query_shots: int
    meta_batch_size: int
    inner_steps: int
    inner_lr: float


SETTINGS = {
    "sinusoid": Setting("sinusoid", 0, 10, 10, 25, 1, 0.01),
    "omniglot_5w1s": Setting("omniglot_5w1s", 5, 1, 1, 32, 1, 0.4),
    "omniglot_20w1s": Setting("omniglot_20w1s", 20, 1, 1, 16, 5, 0.1),
    "miniimagenet_5w1s": Setting("miniimagenet_5w1s", 5, 1, 15, 4, 5, 0.01),
}
CONTENDERS = ("learn2learn example", "mamlrun learn2learn", "mamlrun vmap")
ABLATION_VMAP = "mamlrun vmap, torch.func only"
ABLATION_EAGER = "mamlrun vmap, eager batch norm"
PRECISION_LABELS = {"fp32": "fp32", "tf32": "TF32", "bf16": "bf16 autocast"}


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


def _images(
    setting: Setting, omniglot_root: Path | None, required: bool
) -> tuple[torch.Tensor, str]:
    """uint8 images [classes, per class, C, H, W] for the setting, and where they came from.

    Omniglot's are the real ones where `omniglot_root` holds them. Where it does not, a root the
    user named (`required`) is an error: a typo must not benchmark random images unnoticed; the
    default root ($MAMLRUN_DATA) falls back to random images of the same shape, and says so."""
    generator = torch.Generator().manual_seed(0)
    if setting.name.startswith("omniglot"):
        if omniglot_root is not None:
            from mamlrun.data.omniglot import load_omniglot, omniglot_splits

            try:
                data = load_omniglot(omniglot_root)
                train = omniglot_splits(len(data.images))["train"]
                return data.images[train].unsqueeze(2), "real Omniglot (1100 training characters)"
            except UserError as err:
                if required:
                    problem = str(err).split(";")[0]  # its advice is for dataset.root
                    raise UserError(
                        f"omniglot_root={omniglot_root}: {problem}; name a folder with Omniglot's "
                        "two archives (mamlrun data prepare dataset=omniglot downloads them)"
                    ) from None
                console.info(f"no Omniglot under {omniglot_root} ({err}): random images instead")
        shape = (1100, 20, 1, 28, 28)
        source = "random 28x28 images (1100 classes x 20)"
    else:
        # 600 images per class in the real data; 60 keep this benchmark's memory small and do
        # not change the cost of a training step.
        shape = (64, 60, 3, 84, 84)
        source = "random 84x84 RGB images (64 classes x 60)"
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator), source


def _model(setting: Setting) -> torch.nn.Module:
    if setting.ways == 0:
        return mlp((1,), 1, hidden=[40, 40])
    if setting.name.startswith("omniglot"):
        return conv4((1, 28, 28), setting.ways)
    return conv4(
        (3, 84, 84), setting.ways, filters=32, pooling="max", head="flatten", head_init="xavier"
    )


def _plain_learn2learn(setting: Setting, images, device) -> Callable[[], None]:
    """One meta-iteration written as learn2learn's MAML examples write it."""
    l2l = import_learn2learn()
    model = _model(setting).to(device)
    maml = l2l.algorithms.MAML(model, lr=setting.inner_lr, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    regression = setting.ways == 0
    loss_fn = F.mse_loss if regression else F.cross_entropy
    rng = np.random.default_rng(0)
    if not regression:
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
        if setting.name.startswith("omniglot"):
            rotation = l2l.vision.transforms.RandomClassRotation
            transforms.append(rotation(dataset, [0.0, 90.0, 180.0, 270.0]))
        taskset = l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)

    def sinusoid_task():
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        x = rng.uniform(-5, 5, (setting.shots + setting.query_shots, 1))
        y = amplitude * np.sin(x - phase)
        x, y = (torch.tensor(a, dtype=torch.float32, device=device) for a in (x, y))
        return x[: setting.shots], y[: setting.shots], x[setting.shots :], y[setting.shots :]

    def image_task():
        x, y = taskset.sample()
        x, y = x.to(device).float().div_(255), y.to(device)
        k = setting.shots + setting.query_shots
        # positional split as in learn2learn's examples: first `shots` of each class adapt
        support = torch.zeros(len(y), dtype=torch.bool)
        support[(torch.arange(setting.ways) * k)[:, None] + torch.arange(setting.shots)] = True
        order = torch.argsort(y, stable=True).cpu()
        x, y = x[order], y[order]
        return x[support], y[support], x[~support], y[~support]

    next_task = sinusoid_task if regression else image_task

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
    model = _model(setting).to(device)
    task_type = "regression" if setting.ways == 0 else "classification"
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
    if setting.ways == 0:
        sampler = SinusoidTasks(setting.shots, setting.query_shots, seed=0, device=device)
    else:
        sampler = TensorClassificationTasks(
            images,
            range(len(images)),
            setting.ways,
            setting.shots,
            setting.query_shots,
            rotations=setting.name.startswith("omniglot"),
            seed=0,
            device=device,
        )

    def step() -> None:
        batch = sampler.sample(setting.meta_batch_size)
        # as training does between logged iterations (the l2l example measures no "before")
        meta_step(batch, setting.inner_steps, measure_before=False)

    return step


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
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )


def _check_number(key: str, value: str, kind: type, minimum: float) -> None:
    """A numeric option, refused in one line (naming it) where it does not parse or is too small."""
    try:
        ok = kind(value) >= minimum
    except ValueError:
        ok = False
    if not ok:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{key}={value}: expected {what} >= {minimum}")


def run_bench(args: list[str]) -> None:
    """`mamlrun bench [settings=a,b] [repeats=5] [seconds=3] [device=cpu] [output=docs/...]`."""
    options = {
        "settings": ",".join(SETTINGS),
        "repeats": "5",
        "seconds": "3",
        "device": "cpu",
        "threads": "0",
        "output": "docs/benchmarks.md",
        "omniglot_root": "",
        "ablation": "false",
        "compile": "auto",
        "cuda_graphs": "auto",
        "precision": "auto",
    }
    if any(arg in ("-h", "--help") for arg in args):
        keys = "\n".join(f"  {key:<14} {value or '-'}" for key, value in options.items())
        print(f"usage: mamlrun bench [key=value ...]\n\nkeys and defaults:\n{keys}\n\n{__doc__}")
        return
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise UserError(f"{arg}: expected key=value with key in {', '.join(options)}")
        options[key] = value
    for key, kind, minimum in (("repeats", int, 1), ("seconds", float, 0), ("threads", int, 0)):
        _check_number(key, options[key], kind, minimum)
    if not DEVICE_PATTERN.fullmatch(options["device"]):
        raise UserError(f"device={options['device']}: expected cpu, cuda or cuda:N")
    if options["ablation"] not in ("true", "false"):
        raise UserError(f"ablation={options['ablation']}: expected true or false")
    for key in ("compile", "cuda_graphs"):
        if options[key] not in ("auto", "true", "false"):
            raise UserError(f"{key}={options[key]}: expected auto, true or false")
    if options["precision"] not in ("auto", *PRECISION_LABELS):
        raise UserError(f"precision={options['precision']}: expected auto, fp32, tf32 or bf16")
    names = options["settings"].split(",")
    for name in names:
        if name not in SETTINGS:
            raise UserError(f"settings={name}: unknown (choose from {', '.join(SETTINGS)})")
    device = select_device(
        Hardware(
            name="bench",
            device=options["device"],
            threads=int(options["threads"]),
            deterministic=False,
        ),
        key="device",
        on_cpu="device=cpu",
    )
    # auto: as training runs by default on this device (conf/hardware/cpu.yaml, cuda.yaml)
    shipped = hardware_defaults(device.type)
    on_cuda = device.type == "cuda"

    def flag(key: str, shipped_value: bool) -> bool:
        return shipped_value if options[key] == "auto" else options[key] == "true"

    default = VmapOptions(
        compile_kernels=flag("compile", shipped.compile),
        cuda_graph=flag("cuda_graphs", shipped.cuda_graphs in (True, "auto") and on_cuda),
        precision=shipped.precision if options["precision"] == "auto" else options["precision"],
    )
    tf32 = default.precision == "tf32"
    for key, cuda_only in (("cuda_graphs", default.cuda_graph), ("precision", tf32)):
        if cuda_only and not on_cuda:
            raise UserError(f"{key}={options[key]}: for CUDA devices only (add device=cuda)")
    variants = {"mamlrun vmap": default}
    if options["ablation"] == "true":
        variants.update(ablation_rows(default, device))
    contenders = CONTENDERS[:2] + tuple(variants)
    root = options["omniglot_root"] or os.environ.get("MAMLRUN_DATA")
    hardware = hardware_description(device)
    console.info(f"benchmarking on {hardware}")
    results = []
    for name in names:
        setting = SETTINGS[name]
        images, source = (
            (None, "sampled on the fly")
            if setting.ways == 0
            else _images(
                setting, Path(root).expanduser() if root else None, bool(options["omniglot_root"])
            )
        )
        steps = {
            "learn2learn example": _plain_learn2learn(setting, images, device),
            "mamlrun learn2learn": _mamlrun_step(setting, images, device, None),
        }
        for label, variant in variants.items():
            steps[label] = _mamlrun_step(setting, images, device, variant)
        rates: dict[str, list[float]] = {c: [] for c in contenders}
        memory: dict[str, float] = {}

        def use_precision(contender: str) -> None:  # a process-wide switch, set per contender
            if on_cuda:
                set_cuda_precision(variants.get(contender, default).precision)

        # warm-up: allocator, caches, lazy initialisation, compiling, CUDA graph capture
        for _ in range(WARMUP_STEPS + 2 if on_cuda else 1):
            for contender, step in steps.items():
                use_precision(contender)
                _tracking_peak_memory(step, device, memory, contender)
        for repeat in range(int(options["repeats"])):
            for contender, step in steps.items():
                use_precision(contender)
                timed = partial(_timed, step, float(options["seconds"]), device)
                rate, _ = _tracking_peak_memory(timed, device, memory, contender)
                rates[contender].append(rate)
            # after every repeat: a bench stopped by a time limit keeps what it measured
            _write_section(results + _summary(setting, source, rates, memory), hardware, options)
            console.info(
                f"{name}: repeat {repeat + 1}/{options['repeats']} "
                + ", ".join(f"{c} {rates[c][-1]:.2f} it/s" for c in contenders)
            )
        results += _summary(setting, source, rates, memory)
        del steps
    console.print_table(
        f"Meta-training throughput, second-order MAML ({hardware})",
        COLUMNS,
        _table_rows(results, int(options["repeats"])),
    )
    if options["output"]:
        console.info(f"wrote {options['output']}")


def _summary(
    setting: Setting, source: str, rates: dict[str, list[float]], memory: dict[str, float]
) -> list[dict]:
    """One result per contender: median and spread of its repeats, ratio to the example's."""
    baseline = statistics.median(rates[CONTENDERS[0]])
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
    "× plain l2l",
    "peak GPU MiB",
]


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
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
        ]
        for r in results
    ]


def _write_section(results: list[dict], hardware: str, options: dict) -> None:
    """Replace this hardware's section of the output file (none when output is empty)."""
    if not options["output"]:
        return
    rows = _table_rows(results, int(options["repeats"]))
    command = "mamlrun bench " + " ".join(f"{k}={v}" for k, v in options.items() if v)
    lines = [
        f"## {hardware}",
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}; {options['repeats']} interleaved repeats of "
        f"at least {options['seconds']} s each; median, min-max).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Data: " + "; ".join(sorted({f"{r['setting']}: {r['data']}" for r in results})) + ".",
        "",
    ]
    path = Path(options["output"])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else _DOC_HEADER
    # One section per hardware: a rerun on the same hardware replaces its section.
    sections = text.split("\n## ")
    kept = [sections[0].rstrip("\n")] + [
        "## " + s.rstrip("\n") for s in sections[1:] if not s.startswith(hardware)
    ]
    path.write_text("\n\n".join([*kept, "\n".join(lines)]))
