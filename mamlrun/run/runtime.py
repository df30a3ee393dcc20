"""Process set-up for a run: the device, threads, determinism, CUDA precision, malloc and seeds.

Process-wide switches, set once per command before any model is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

from mamlrun.config.schema import Hardware
from mamlrun.errors import UserError


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
    torch.set_num_threads(hardware.threads or default_threads())
    torch.use_deterministic_algorithms(hardware.deterministic, warn_only=True)
    return device


def default_threads() -> int:
    """Intra-op threads for `hardware.threads=0`: this process's share of its cores.

    The cores are SLURM's allocation in a SLURM job (`SLURM_CPUS_PER_TASK`: the node may have more
    than the job may use), else the CPUs this process may run on; the share divides them by
    `MAMLRUN_CONCURRENT_JOBS`, the jobs running at once, which mamlrun's sweep launchers set
    (several processes that each take every core run many times slower than with one each), and
    by the ranks of a data-parallel run on this node (torchrun's LOCAL_WORLD_SIZE).
    """
    from mamlrun.run.distributed import local_processes

    cores = max(1, len(os.sched_getaffinity(0)) // local_processes())
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores = int(os.environ["SLURM_CPUS_PER_TASK"])
    concurrent = os.environ.get("MAMLRUN_CONCURRENT_JOBS", "1")
    return max(1, cores // max(1, int(concurrent) if concurrent.isdigit() else 1))


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
    fault in and zero again. With blocks up to 1 GB served from the heap and no trimming below
    2 GB, an iteration reuses its pages (tests/test_runtime.py counts the page faults; the speed
    gained and the resident memory it costs are in docs/benchmarks.md). Nothing is changed where
    the user set glibc's own variables (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
    glibc.malloc tunables), or off glibc (another libc, or an allocator such as jemalloc
    preloaded, which mallopt does not reach).

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


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"
