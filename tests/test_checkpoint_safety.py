"""Checkpoints are data, never code; writes lose nothing; one `mamlrun train` per run directory.

Every case runs the console script as a user would: hostile and old files, a file-size limit
during a checkpoint write, and two processes on one run directory.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import MAMLRUN, QUICK, refused, run_mamlrun
from mamlrun.run import rundir

LINEAR = {"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}
SHORT = [*QUICK, "train.eval_at_end=false", "algorithm.meta_batch_size=5"]


class _Hostile:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short sinusoid run with checkpoints at iterations 10 and 20."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    run_mamlrun("train", *SHORT, "train.iterations=20", f"hydra.run.dir={run_dir}", cwd=root)
    return run_dir


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path):
    marker = tmp_path / "pwned"
    hostile_run = tmp_path / "hostile"
    (hostile_run / ".hydra").mkdir(parents=True)
    evil = rundir.checkpoint_path(hostile_run)
    evil.parent.mkdir()
    torch.save({"model": _Hostile(marker), "config": {}, "iteration": 1}, evil)
    for args in (
        ("eval", f"checkpoint={evil}", f"hydra.run.dir={tmp_path / 'eval'}"),
        ("train", f"resume={hostile_run}"),
        ("report", str(hostile_run)),
    ):
        result = run_mamlrun(*args, cwd=tmp_path, expect_ok=False)
        line = _error_line(result)
        assert result.returncode == 2, (args, result.stderr)
        assert str(evil) in line and "refused" in line and "posix.system" in line, line
        assert not marker.exists(), f"{args[0]} ran the file's code"


def test_the_payload_is_data_only_and_loads_with_weights_only(trained):
    payload = torch.load(rundir.checkpoint_path(trained), weights_only=True)
    rundir.check_data(payload)  # every key, samplers and optimizer state included
    assert isinstance(payload["rng"]["numpy"][1], torch.Tensor)
    name, keys, *rest = payload["rng"]["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # exact round trip


def test_an_old_checkpoint_names_the_conversion_which_makes_it_usable(trained, tmp_path):
    payload = torch.load(rundir.checkpoint_path(trained), weights_only=True)
    payload["rng"]["numpy"] = np.random.get_state()  # how mamlrun saved it before
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    refused = run_mamlrun("eval", f"checkpoint={old}", cwd=tmp_path, expect_ok=False)
    line = _error_line(refused)
    assert refused.returncode == 2 and f"mamlrun checkpoint convert {old}" in line, line
    new = tmp_path / "new.pt"
    run_mamlrun("checkpoint", "convert", str(old), "--out", str(new), cwd=tmp_path)
    converted = torch.load(new, weights_only=True)
    keys = payload["rng"]["numpy"][1]
    assert (converted["rng"]["numpy"][1].numpy() == keys).all() and len(keys) == 624
    run_mamlrun("eval", f"checkpoint={new}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert (tmp_path / "e" / "eval.json").is_file()


def test_a_model_target_in_a_checkpoint_needs_trust_on_the_command_line(trained, tmp_path):
    payload = torch.load(rundir.checkpoint_path(trained), weights_only=True)
    linear = torch.nn.Linear(1, 1)
    payload["config"]["model"] = {
        "_target_": "torch.nn.Linear",
        "in_features": 1,
        "out_features": 1,
    }
    payload["model"] = linear.state_dict()
    target_pt = tmp_path / "target.pt"
    rundir.save(target_pt, payload)
    marker = tmp_path / "built"
    payload["config"]["model"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    system_pt = tmp_path / "system.pt"
    rundir.save(system_pt, payload)
    for checkpoint in (target_pt, system_pt):
        refused = run_mamlrun("eval", f"checkpoint={checkpoint}", cwd=tmp_path, expect_ok=False)
        line = _error_line(refused)
        assert refused.returncode == 2 and "trust_model_target=true" in line, line
    assert not marker.exists()
    out = tmp_path / "trusted"
    args = (f"checkpoint={target_pt}", "trust_model_target=true", f"hydra.run.dir={out}")
    run_mamlrun("eval", *args, cwd=tmp_path)
    assert (out / "eval.json").is_file()


def test_resume_of_a_model_target_needs_trust(trained, tmp_path):
    run_dir = tmp_path / "run"
    payload = torch.load(rundir.checkpoint_path(trained), weights_only=True)
    payload["config"]["model"] = {
        "_target_": "torch.nn.Linear",
        "in_features": 1,
        "out_features": 1,
    }
    payload["model"] = torch.nn.Linear(1, 1).state_dict()
    payload["optimizer"] = torch.optim.Adam(torch.nn.Linear(1, 1).parameters()).state_dict()
    rundir.save(rundir.checkpoint_path(run_dir), payload)
    refused = run_mamlrun("train", f"resume={run_dir}", cwd=tmp_path, expect_ok=False)
    assert refused.returncode == 2 and "trust_model_target=true" in _error_line(refused)
    resume = (f"resume={run_dir}", "trust_model_target=true", "train.iterations=22")
    run_mamlrun("train", *resume, *SHORT[:1], cwd=tmp_path)
    assert torch.load(rundir.checkpoint_path(run_dir), weights_only=True)["iteration"] == 22


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_that_fails_keeps_the_previous_checkpoint(trained, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT, "train.iterations=10", f"hydra.run.dir={run_dir}"]
    run_mamlrun("train", *args, cwd=tmp_path)
    last = rundir.checkpoint_path(run_dir)
    before = last.read_bytes()
    limit = len(before) // 2  # the next checkpoint cannot be written; metrics.jsonl can
    env = {**os.environ, "WANDB_SILENT": "true", "COLUMNS": "160"}
    result = subprocess.run(
        [*MAMLRUN, "train", f"resume={run_dir}", "train.iterations=20", *SHORT[:1]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        preexec_fn=_limit_file_size(limit),
    )
    assert result.returncode != 0
    line = _error_line(result)
    assert "error:" in line and str(run_dir / "checkpoints") in line, line
    assert "ulimit -f" in line and f"resume={run_dir}" in line, line
    assert last.read_bytes() == before, "the previous last.pt must stay intact"
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(last, weights_only=True)["iteration"] == 10
    run_mamlrun("train", f"resume={run_dir}", "train.iterations=20", *SHORT[:1], cwd=tmp_path)
    assert torch.load(last, weights_only=True)["iteration"] == 20


def test_a_second_train_into_a_held_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT, "train.iterations=100000", "train.checkpoint_every=5"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    first = subprocess.Popen(
        [*MAMLRUN, "train", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        last = rundir.checkpoint_path(run_dir)
        deadline = time.monotonic() + 300
        while not last.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert last.exists(), "the first run never wrote a checkpoint"
        # both refusals by mamlrun's entry point in this process, another one than the holder's
        line = refused("train", f"resume={run_dir}", cwd=tmp_path)
        assert str(run_dir) in line and f"pid {first.pid}" in line, line
        # a new run of another config into it: refused, and the run's .hydra/ files unchanged
        hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        other = [*SHORT, "seed=5", "resume=null", f"hydra.run.dir={run_dir}"]
        assert f"pid {first.pid}" in refused("train", *other, cwd=tmp_path)
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    finally:
        first.kill()  # SIGKILL: its lock is left behind for the kernel to release
        first.wait()
    iteration = torch.load(last, weights_only=True)["iteration"]
    resume = (f"resume={run_dir}", f"train.iterations={iteration + 2}", *SHORT[:1])
    run_mamlrun("train", *resume, cwd=tmp_path)
    assert torch.load(last, weights_only=True)["iteration"] == iteration + 2


@pytest.mark.parametrize("name", ["ClassificationTasks", "TensorClassificationTasks"])
def test_both_image_samplers_states_are_data(name):
    from mamlrun.data import fewshot

    images = torch.randint(0, 256, (6, 5, 1, 4, 4), dtype=torch.uint8)  # 6 classes of 5 images
    tasks = getattr(fewshot, name)(images, list(range(6)), ways=3, shots=1, query_shots=2)
    tasks.sample(2)
    state = tasks.state_dict()
    rundir.check_data(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = getattr(fewshot, name)(images, list(range(6)), ways=3, shots=1, query_shots=2, seed=9)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    pairs = zip(tasks.sample(2).tensors(), again.sample(2).tensors(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_check_data_names_what_is_not_data():
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        rundir.check_data({"rng": {"numpy": np.random.get_state()}})
