"""Shared helpers: run the installed `mamlrun` console script as a user would, in a temp dir."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import omniglot_as_folder  # noqa: E402  (scripts/ is not a package)

from mamlrun.analysis.throughput import THROUGHPUT_ENV, THROUGHPUT_FILE
from mamlrun.maml.models import BatchStatNorm

# Under pytest-xdist (`make test`) several test files run at once: each worker's mamlrun processes
# (and torch in the worker itself) take their share of the cores, as the jobs of
# hydra/launcher=parallel do, instead of every process taking every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKERS = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    os.environ.setdefault("MAMLRUN_CONCURRENT_JOBS", _WORKERS)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(_WORKERS)))

# The installed console script, as users run it; `python -m mamlrun` where there is none (the
# GPU machines install mamlrun into a target folder without scripts).
_SCRIPT = Path(sys.executable).with_name("mamlrun")
MAMLRUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mamlrun"]

# The real Omniglot archives (../shared/data/omniglot). Tests of them skip where they are absent,
# except under CI=true, where they must be there.
OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file() and os.environ.get("CI") != "true",
    reason=f"the real Omniglot archives are not in {OMNIGLOT}",
)


def omniglot_characters(archive: str) -> dict[str, list[str]]:
    """ "<set>/<alphabet>/<character>" -> its drawings' members in an official Omniglot zip."""
    return omniglot_as_folder.omniglot_characters(OMNIGLOT / archive)


def write_drawings(character: str, destination: Path, drawings: slice = slice(None)) -> list[Path]:
    """Raw 105x105 PNG drawings of an Omniglot character copied into `destination`, as a user's
    folder would hold them (scripts/omniglot_as_folder.py)."""
    return omniglot_as_folder.write_drawings(OMNIGLOT, character, destination, drawings)


# Small settings for a run that finishes in seconds; tests add what they check on top.
QUICK = [
    "print_config=false",
    "logger=none",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=20",
    "train.checkpoint_every=10",
    "eval.tasks=20",
    "eval.plot_tasks=2",
]


def run_mamlrun(*args: str, cwd: Path, expect_ok: bool = True, timeout: int = 600):
    """Run `mamlrun ARGS` in `cwd`; returns the CompletedProcess (stdout and stderr as text)."""
    env = {**os.environ, "WANDB_SILENT": "true", "COLUMNS": "160"}
    env.pop("WANDB_MODE", None)
    result = subprocess.run(
        [*MAMLRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    if expect_ok and result.returncode != 0:
        raise AssertionError(
            f"mamlrun {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
        )
    return result


def in_process(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`mamlrun ARGS` through the console script's own entry point (`mamlrun.cli.main`) in this
    process: (exit status, stdout, stderr). For commands that run no training (refusals,
    reports), many in a row: no interpreter and torch start per call."""
    from rich.console import Console

    from mamlrun import console
    from mamlrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, code, terminal = os.getcwd(), 0, console.console
    os.chdir(cwd)
    console.console = Console(highlight=False, width=160)  # as a pipe gets it, under any worker
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.chdir(here)
        console.console = terminal
    return code, out.getvalue(), err.getvalue()


def refused(*args: str, cwd: Path) -> str:
    """`mamlrun ARGS` `in_process`, which must refuse it as bad input: exit status 2 and one
    line on stderr, returned (each test file still runs the real console script too)."""
    code, _, err = in_process(*args, cwd=cwd)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, code, err)
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _private_throughput_file(tmp_path_factory):
    """Benches in tests write a copy of the shipped throughput file, never the file itself
    (`throughput=shipped`, the default, and reproduce both follow $MAMLRUN_THROUGHPUT)."""
    copy = tmp_path_factory.mktemp("throughput") / THROUGHPUT_FILE.name
    copy.write_text(THROUGHPUT_FILE.read_text())
    saved = os.environ.get(THROUGHPUT_ENV)
    os.environ[THROUGHPUT_ENV] = str(copy)
    yield copy
    if saved is None:
        os.environ.pop(THROUGHPUT_ENV)
    else:
        os.environ[THROUGHPUT_ENV] = saved


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mamlrun")


def relative_error(actual, expected) -> float:
    """Norm of the difference over the norm of the reference: elementwise checks are too strict
    for second-order MAML through batch norm, whose small entries carry large rounding error."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def cancelled_biases(model: nn.Sequential) -> set[str]:
    """Biases of the layers right before batch norm: it subtracts them out, so their exact
    meta-gradient is 0 and what any engine computes is rounding noise, with no relative error
    (and Adam turns the noise's sign into a step of up to its learning rate either way)."""
    layers = list(model.named_children())
    return {
        f"{name}.bias"
        for (name, _), (_, following) in zip(layers[:-1], layers[1:], strict=True)
        if isinstance(following, BatchStatNorm)
    }
