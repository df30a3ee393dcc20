"""Process set-up done by `mamlrun.run.runtime.select_device`: glibc's malloc keeps freed memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# An iteration's allocation pattern in miniature: three 48 MB activations (above the 32 MB up to
# which glibc's own mmap threshold adapts, as miniImageNet's), written, then freed. Prints whether
# the thresholds were set and the page faults of the last 7 of 10 iterations: the tuned heap grows
# to its size within the first 3 (in which iteration it does varies from run to run).
_ITERATIONS = """
import json, resource, sys
import torch
from mamlrun.run.runtime import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(12 << 20) for _ in range(3)]
    del activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": sum(faults[3:])}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    result = subprocess.run(
        [sys.executable, "-c", _ITERATIONS, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_activations_are_reused_without_page_faults():
    default, tuned = _run("default"), _run("tune")
    assert tuned["tuned"] and not default["tuned"]
    # glibc's defaults map and unmap each block every iteration (7 x 36k pages to fault in)
    assert default["faults"] > 7 * 10_000, default
    assert tuned["faults"] < default["faults"] / 10, (tuned, default)


@pytest.mark.parametrize(
    "variable, value",
    [("MALLOC_TRIM_THRESHOLD_", "1000000"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")],
)
def test_user_malloc_settings_are_left_alone(variable, value):
    assert not _run("tune", **{variable: value})["tuned"]
