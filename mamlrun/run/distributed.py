"""Data-parallel meta-training over torch.distributed: one meta-batch split across processes.

`DistributedDataParallel` does not work with MAML (it documents no support for
`torch.autograd.grad` with `create_graph`), so the meta-gradient is summed by hand: each rank's
engine computes the mean meta-gradient of its share of the meta-batch, `MetaGradientSum` scales it
by local/global tasks and sums it over the ranks in one flattened all-reduce, between the engine's
`meta_gradient` and clipping / the optimizer step (`MetaStep(reduce=...)`). The maml/ layer
knows nothing of processes.

Task streams: every rank draws the same global meta-batch from the same seeded sampler and keeps
its own slice (`World.share`). The ranks together see exactly the tasks one process sees, every
rank's sampler state is the same (a checkpoint holds it once), and a run may be resumed with
another world size (it continues the same task stream). The price is that every rank samples the
whole meta-batch, which docs/distributed.md measures.

The launchers are torch's and SLURM's: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous (MASTER_ADDR, MASTER_PORT); srun sets SLURM_PROCID / SLURM_STEP_NUM_TASKS /
SLURM_LOCALID, and the rendezvous is the job's first node on a port derived from the job id unless
MASTER_ADDR / MASTER_PORT are set. Collectives time out after $MAMLRUN_DIST_TIMEOUT seconds, so a
rank whose peer died fails instead of waiting forever.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mamlrun.errors import ConfigError, UserError
from mamlrun.maml.batch import TaskBatch

TIMEOUT_ENV = "MAMLRUN_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 300
# SLURM jobs without MASTER_PORT rendezvous on PORT_BASE + job id % PORT_SPAN: below Linux's
# ephemeral ports (32768 up), which any process's connections (gloo's among them) take at random.
PORT_BASE, PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of one run.

    Attributes:
        rank: this process's number, 0..size-1; rank 0 alone writes the run's files.
        size: how many processes train the run together (1: no torch.distributed at all).
        local_rank: its number on its node (picks its GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, tasks: int) -> slice:
        """This rank's slice of `tasks` tasks: contiguous, sizes differing by one at most."""
        base, extra = divmod(tasks, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def slice(self, batch: TaskBatch) -> TaskBatch:
        """This rank's tasks of a meta-batch every rank drew alike."""
        if not self.distributed:
            return batch
        part = self.share(len(batch))
        return batch.slice(part.start, part.stop)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def detect(environ: Mapping[str, str] | None = None) -> World:
    """The world this process was launched into: torchrun's variables, else an srun step's, else
    one process. SLURM_NTASKS alone is not enough: a batch script of a multi-task job runs once,
    as task 0, and only srun's steps set SLURM_STEP_NUM_TASKS."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        size = int(env["SLURM_STEP_NUM_TASKS"])
        return World(int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)))
    return World()


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many of torchrun's ranks share this node and its cores (LOCAL_WORLD_SIZE). A SLURM
    task needs no such share: its CPUs are its own (SLURM_CPUS_PER_TASK, its affinity)."""
    env = os.environ if environ is None else environ
    return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))


def rendezvous(environ: dict[str, str] | None = None) -> None:
    """Set MASTER_ADDR / MASTER_PORT for an srun step that has none: its first node, and a port
    derived from the job id (every task of the job derives the same)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        env["MASTER_ADDR"] = _first_host(nodes)
    env.setdefault("MASTER_PORT", str(PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN))


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[01-04],gpu7` -> node01), as scontrol says."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    if shutil.which("scontrol"):
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        ).stdout.split()
        if hosts:
            return hosts[0]
    prefix, _, rest = nodelist.partition("[")
    return prefix + rest.split(",")[0].split("-")[0].rstrip("]")


def timeout_s() -> float:
    """$MAMLRUN_DIST_TIMEOUT (seconds), else DEFAULT_TIMEOUT_S.

    Raises:
        UserError: the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={text}: must be a positive number of seconds")
    return value


def check_meta_batch(meta_batch_size: int, world: World) -> None:
    """Each rank takes an equal share of the meta-batch.

    Raises:
        ConfigError: it does not divide by the world size.
    """
    if meta_batch_size % world.size:
        raise ConfigError(
            f"algorithm.meta_batch_size={meta_batch_size} does not divide by the world size "
            f"{world.size}; use a multiple of {world.size} or launch a divisor of "
            f"{meta_batch_size} processes"
        )


def device_for(device: str, world: World) -> str:
    """The device of this rank: `cuda` is each rank's own GPU on its node (LOCAL_RANK).

    Raises:
        UserError: the node has fewer GPUs than ranks (NCCL cannot put two ranks on one GPU).
    """
    if world.distributed and device == "cuda":
        gpus = torch.cuda.device_count()
        if world.local_rank >= gpus:
            raise UserError(
                f"rank {world.rank} is local rank {world.local_rank} on a node with {gpus} "
                f"GPU(s): start at most {gpus} rank(s) per node (torchrun --nproc-per-node, "
                "srun --ntasks-per-node), one per GPU"
            )
        return f"cuda:{world.local_rank}"
    return device


def setup(world: World, device: str) -> None:
    """Initialize the process group (once per process): gloo on a CPU, NCCL on CUDA, with the
    collectives' timeout; nothing for one process."""
    if not world.distributed or dist.is_initialized():
        return
    rendezvous()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    options: dict[str, Any] = {}
    if backend == "nccl":
        options["device_id"] = torch.device(device_for(device, world))
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(seconds=timeout_s()),
        **options,
    )


def shutdown(world: World, clean: bool) -> None:
    """End this process's part in the process group. After a run that ended well (`clean`),
    wait for every rank first: rank 0 may still be writing eval.json and plots, and a rank
    that exits early makes torchrun stop the others. After a failure, leave at once (a peer may
    be gone). Without it gloo's threads abort the interpreter's exit."""
    if not world.distributed or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


class MetaGradientSum:
    """`MetaStep`'s `reduce`: the global meta-batch's mean meta-gradient and statistics on every
    rank, from each rank's mean over its own tasks, in one flattened all-reduce.

    Each rank's share (`World.share` of the meta-batch) is scaled by its tasks over the global
    tasks before the sum, so the result is the mean over the global meta-batch (equal to one
    process's to rounding). One more element of the same buffer carries `stop`: set by a rank
    asked to stop (a signal), summed, read as `agreed_stop`, so that every rank ends after the
    same iteration.

    Args:
        parameters: the meta-parameters, whose `.grad` the engine has just filled.
        world: the processes training together.
        global_tasks: the tasks of one meta-batch, all ranks' together.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], world: World, global_tasks: int) -> None:
        self.parameters = list(parameters)
        local_tasks = len(range(global_tasks)[world.share(global_tasks)])
        self.world, self.scale = world, local_tasks / global_tasks
        first = self.parameters[0]
        self.stop = torch.zeros(1, dtype=first.dtype, device=first.device)
        self.agreed = torch.zeros(1, dtype=first.dtype, device=first.device)

    def __call__(self, stats: dict[str, Any]) -> dict[str, Any]:
        params = self.parameters
        dtype, device = params[0].dtype, params[0].device
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        names = list(stats)
        values = [torch.as_tensor(stats[k], dtype=dtype, device=device).reshape(1) for k in names]
        flat = torch.cat([*(g.reshape(-1) for g in grads), *values]).mul_(self.scale)
        flat = torch.cat([flat, self.stop])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            if param.grad is None:
                param.grad = grad
            param.grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        self.agreed.copy_(flat[-1:])
        return {name: flat[offset + i] for i, name in enumerate(names)}

    def request_stop(self) -> None:
        self.stop.fill_(1.0)

    def agreed_stop(self) -> bool:
        """Whether any rank asked to stop at the last step (reads the flag on the host)."""
        return bool(self.agreed.item() > 0)


def broadcast_parameters(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank: all ranks start from the same point."""
    if world.distributed:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A cheap fingerprint of the parameters: their sum and a position-weighted sum, float64."""
    total = torch.zeros(2, dtype=torch.float64)
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).double().cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(97)
        total += torch.stack([flat.sum(), (flat * weights).sum()])
    return total


def digest(value: Any) -> str:
    """A hash of plain data (tensors, numbers, strings, containers): sampler and RNG states."""
    found = hashlib.sha256()

    def add(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            found.update(item.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(item, dict):
            for key in sorted(item, key=str):
                found.update(str(key).encode())
                add(item[key])
        elif isinstance(item, list | tuple):
            for part in item:
                add(part)
        else:
            found.update(repr(item).encode())

    add(value)
    return found.hexdigest()


def check_in_sync(module: torch.nn.Module, world: World, iteration: int, state: Any = None) -> None:
    """Every rank holds the same parameters (their checksums are bit-equal) and the same `state`
    (the sampler's and the RNGs': what a checkpoint, written by rank 0, holds once for all).

    Raises:
        RuntimeError: they differ: a bug, not a setting, so no UserError.
    """
    if not world.distributed:
        return
    mine = (checksum(module.parameters()), digest(state))
    found = world.gather(mine)
    if any(not torch.equal(found[0][0], sums) for sums, _ in found[1:]):
        raise RuntimeError(
            f"iteration {iteration}: the ranks' parameters differ (checksums "
            f"{[sums.tolist() for sums, _ in found]}); data-parallel training lost step"
        )
    if any(found[0][1] != other for _, other in found[1:]):
        raise RuntimeError(
            f"iteration {iteration}: the ranks' task sampler or RNG states differ; "
            "data-parallel training lost step"
        )


def gather_curves(
    world: World, curves: Callable[[TaskBatch], dict[str, torch.Tensor]], batch: TaskBatch
) -> dict[str, torch.Tensor]:
    """`curves(batch)` (per-task rows) computed on each rank's share of `batch`, concatenated in
    task order on every rank: the same rows one process computes on the whole batch."""
    if not world.distributed:
        return curves(batch)
    part = world.share(len(batch))
    mine = curves(batch.slice(part.start, part.stop)) if part.stop > part.start else None
    parts = [p for p in world.gather(mine) if p is not None]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
