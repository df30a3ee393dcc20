"""Meta-training throughput of data-parallel ranks against one process, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_distributed.py [--ranks 2] [--seconds 20]
        [--rounds 2] [--settings omniglot_5w1s omniglot_20w1s] [--device cpu]

For each setting (the paper's preset `conf/experiment/finn2017/<setting>.yaml`: its meta-batch,
inner steps and learning rates, second order, the vmap engine) it runs training's own step
(`MetaStep` with the task sampler, the model and the optimizer training builds) in two ways:

- `1 process`: one process with `--ranks` threads;
- `N ranks`: `--ranks` processes of one thread each over gloo (one GPU each, NCCL, with
  `--device cuda`; with one GPU the ranks share it), each adapting its share of the meta-batch and
  summing the meta-gradient with `MetaGradientSum`'s one all-reduce per step, as training does.

The images are synthetic, of Omniglot's shape (1623 classes of 20 images, 28x28), so that no
dataset is read; the cost of a step does not depend on what the pixels show. Every rank draws the
whole meta-batch and keeps its share (the design of `mamlrun.run.distributed`); the draw columns
are the time of that draw alone on one thread, with the tensor sampler and the learn2learn one.
Each contender runs one untimed warm-up of 3 steps, then steps for `--seconds`; the rounds
alternate the contenders' order and the table gives each one's median iterations per second and
the ratio. Results go to docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mamlrun.config.compose import compose_config
from mamlrun.config.validate import validate
from mamlrun.data.fewshot import ClassificationTasks, TensorClassificationTasks
from mamlrun.maml.step import MetaStep
from mamlrun.run.build import engine_for, meta_optimizer, model_for
from mamlrun.run.distributed import MetaGradientSum, World
from mamlrun.run.runtime import cpu_model, select_device

WARMUP_STEPS = 3
OMNIGLOT_SHAPE = (1623, 20, 28, 28)


def _config(setting: str, device: str):
    overrides = [f"experiment=finn2017/{setting}", "logger=none", f"hardware.device={device}"]
    if device.startswith("cuda"):
        overrides.insert(1, "hardware=cuda")
    return validate(compose_config(overrides))


def _images() -> torch.Tensor:
    return torch.randint(0, 256, OMNIGLOT_SHAPE, dtype=torch.uint8, generator=torch.Generator())


def _sampler(config, images, device, kind: str = "tensor"):
    dataset = config.dataset
    options = dict(
        ways=dataset.ways,
        shots=dataset.shots,
        query_shots=dataset.train_query_shots,
        rotations=dataset.rotations,
        seed=0,
    )
    if kind == "learn2learn":
        return ClassificationTasks(images, range(1200), **options)
    return TensorClassificationTasks(images, range(1200), device=device, **options)


def steps_per_second(setting: str, world: World, device: str, seconds: float) -> float:
    """Training's step on `world`'s share of every meta-batch, for `seconds` after the warm-up."""
    config = _config(setting, device)
    # training's process set-up (malloc, determinism, precision) with this contender's threads
    select_device(dataclasses.replace(config.hardware, threads=torch.get_num_threads()))
    torch.manual_seed(0)
    model = model_for(config.model, config.dataset).to(device)
    engine = engine_for(model, config.algorithm, config.dataset, config.hardware)
    optimizer = meta_optimizer(model, config.algorithm)
    size = config.algorithm.meta_batch_size
    reduce = None
    if world.distributed:
        reduce = MetaGradientSum(model.parameters(), world, size)
    step = MetaStep(engine, optimizer, reduce=reduce)
    sampler = _sampler(config, _images(), device)
    inner = config.algorithm.inner_steps

    def one() -> None:
        batch = world.slice(sampler.sample(size)).to(device)
        float(step(batch, inner, measure_before=False)["loss_post"])  # waits for the step

    for _ in range(WARMUP_STEPS):
        one()
    done, started = 0, time.perf_counter()
    clock = torch.zeros(1, dtype=torch.float64)
    while True:
        one()
        done += 1
        # every rank stops after the same step: rank 0's clock decides (one 8-byte broadcast)
        clock.fill_(time.perf_counter() - started)
        if world.distributed:
            dist.broadcast(clock, src=0)
        if clock.item() >= seconds:
            return done / clock.item()


def sampling_ms(setting: str, kind: str, repeats: int = 20) -> float:
    """Milliseconds to draw one whole meta-batch of `setting` with the `kind` sampler."""
    config = _config(setting, "cpu")
    sampler = _sampler(config, _images(), "cpu", kind)
    size = config.algorithm.meta_batch_size
    sampler.sample(size)
    started = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(size)
    return 1000 * (time.perf_counter() - started) / repeats


def _rank(rank: int, size: int, port: int, options, out: str) -> None:
    torch.set_num_threads(1)
    device = options.device
    backend = "gloo"
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        backend = "nccl" if torch.cuda.device_count() >= size else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    world = World(rank, size, rank)
    for setting in options.settings:
        rate = steps_per_second(setting, world, device, options.seconds)
        if world.is_main:
            Path(out, setting).write_text(str(rate))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks_rates(options) -> dict[str, float]:
    """Steps per second of `options.ranks` spawned ranks, per setting (rank 0's clock)."""
    with tempfile.TemporaryDirectory() as out:
        args = (options.ranks, _free_port(), options, out)
        mp.spawn(_rank, args=args, nprocs=options.ranks, join=True)
        return {s: float(Path(out, s).read_text()) for s in options.settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settings", nargs="+", default=["omniglot_5w1s", "omniglot_20w1s"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    ranks = options.ranks
    device = "cuda:0" if options.device == "cuda" else options.device
    parallel: dict[str, list[float]] = {s: [] for s in options.settings}
    single: dict[str, list[float]] = {s: [] for s in options.settings}
    for round_ in range(options.rounds):  # alternated: a shared machine's load hits both
        for contender in ("ranks", "single")[:: 1 if round_ % 2 == 0 else -1]:
            if contender == "ranks":
                for setting, rate in _ranks_rates(options).items():
                    parallel[setting].append(rate)
                continue
            torch.set_num_threads(ranks)
            for setting in options.settings:
                single[setting].append(steps_per_second(setting, World(), device, options.seconds))
    parallel = {s: statistics.median(rates) for s, rates in parallel.items()}
    single = {s: statistics.median(rates) for s, rates in single.items()}
    where = torch.cuda.get_device_name(0) if options.device == "cuda" else cpu_model()
    print(
        f"{where}, {len(os.sched_getaffinity(0))} cores; {options.seconds:g} s per contender, "
        f"median of {options.rounds} round(s); "
        f"torch {torch.__version__}; {' '.join(sys.argv[1:]) or 'defaults'}"
    )
    one_name, many_name = f"1 proc x {ranks} thr", f"{ranks} ranks x 1 thr"
    header = f"{'setting':<16} {one_name:>15} {many_name:>15} {'ratio':>6}"
    print(header + f" {'draw tensor':>12} {'draw l2l':>9}")
    torch.set_num_threads(1)  # the draws as one rank makes them
    for setting in options.settings:
        one, many = single[setting], parallel[setting]
        tensor, l2l = sampling_ms(setting, "tensor"), sampling_ms(setting, "learn2learn")
        print(
            f"{setting:<16} {one:>13.2f}/s {many:>13.2f}/s {many / one:>5.2f}x "
            f"{tensor:>9.2f} ms {l2l:>6.1f} ms"
        )


if __name__ == "__main__":
    main()
