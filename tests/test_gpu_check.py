"""scripts/gpu_check.sh (`make gpu-check`), the GPU session's one script: what can be tried
without a GPU, so a lent GPU's minutes are not spent on a typo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_vision_runs import OMNIGLOT, needs_omniglot

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def gpu_check(*steps: str, out: Path, **settings: str) -> subprocess.CompletedProcess:
    """Run the script on the CPU with only `settings` of its own variables set."""
    own = {"OMNIGLOT", "ITERATIONS", "OVERRIDES", "DEVICE", "OUT", "PYTHON"}
    env = {k: v for k, v in os.environ.items() if k not in own}
    env.update({"PYTHON": sys.executable, "OUT": str(out), "DEVICE": "cpu", **settings})
    return subprocess.run(
        ["bash", str(SCRIPT), *steps], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_refuses_to_start_where_there_is_no_cuda(tmp_path):
    result = gpu_check("tests", out=tmp_path, DEVICE="cuda")
    assert result.returncode == 2
    assert "sees no CUDA device (DEVICE=cuda)" in result.stderr
    assert not (tmp_path / "summary.txt").exists()


def test_a_failing_step_is_recorded_and_the_next_ones_still_run(tmp_path):
    result = gpu_check("nosuch", "omniglot", out=tmp_path)
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    statuses = [line.split(",")[0] for line in summary]
    assert statuses == ["nosuch: failed (1)", "omniglot: failed (2)"]
    assert "set OMNIGLOT to the directory" in (tmp_path / "omniglot.log").read_text()


@needs_omniglot
def test_the_omniglot_step_trains_tests_and_reports_its_time(tmp_path):
    overrides = "eval.tasks=20 train.val_tasks=10 hardware.compile=false"
    result = gpu_check(
        "omniglot", out=tmp_path, OMNIGLOT=str(OMNIGLOT), ITERATIONS="3", OVERRIDES=overrides
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "summary.txt").read_text().startswith("omniglot: ok, ")
    run = tmp_path / "omniglot_5w1s"
    assert (run / "eval.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert "wall time" in (tmp_path / "omniglot.log").read_text()
