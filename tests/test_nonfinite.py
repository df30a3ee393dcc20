"""A run that diverges for real (`train.on_nonfinite`): `stop` ends it with one line naming the
iteration and the last good checkpoint, which stays finite and resumes; `skip` drops the
non-finite steps, counts them and finishes with finite weights."""

import math
import re

import torch

from conftest import QUICK, read_jsonl, run_mamlrun

# Adam with meta_lr=2 on the sinusoid MLP (seed 0): three finite steps, then a meta-gradient whose
# square overflows Adam's second moment (iteration 4 on this machine's CPU), later NaN losses.
DIVERGING = [
    *QUICK,
    "algorithm.meta_lr=2",
    "train.log_every=2",
    "train.val_every=5",
    "train.checkpoint_every=1",
    "train.eval_at_end=false",
]
STOP = re.compile(
    r"mamlrun train: error: train\.on_nonfinite=stop: non-finite meta-loss or meta-gradient at "
    r"iteration (\d+); the last good checkpoint is (\S+) \(iteration (\d+)\); lower "
    r"algorithm\.inner_lr / meta_lr, set algorithm\.grad_clip, or train\.on_nonfinite=skip"
)


def _checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)


def _all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(value) for value in state.values())
    if isinstance(state, list | tuple):
        return all(_all_finite(value) for value in state)
    return not isinstance(state, float) or math.isfinite(state)


def _skip_counts(run_dir) -> list[int]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [row["skipped_steps"] for row in rows if row["split"] == "train"]


def test_stop_names_the_iteration_and_the_last_good_checkpoint_which_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ("train", *DIVERGING, "train.iterations=40", f"hydra.run.dir={run_dir}")
    result = run_mamlrun(*args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and (match := STOP.fullmatch(lines[0])), result.stderr[-2000:]
    bad, path, good = int(match[1]), match[2], int(match[3])
    assert path == str(run_dir / "checkpoints/last.pt") and 1 <= good < bad
    state = _checkpoint(run_dir)
    assert state["iteration"] == good and state["skipped_steps"] == 0
    assert _all_finite(state["model"]) and _all_finite(state["optimizer"]["state"])
    rows = read_jsonl(run_dir / "metrics.jsonl")  # the rows logged before the bad step
    assert rows and max(row["iteration"] for row in rows) < bad
    assert all(_all_finite(row) for row in rows) and set(_skip_counts(run_dir)) == {0}

    resumed = run_mamlrun(
        "train", f"resume={run_dir}", "train.iterations=20", "train.on_nonfinite=skip", cwd=tmp_path
    )
    assert f"from iteration {good}" in resumed.stdout
    state = _checkpoint(run_dir)
    assert state["iteration"] == 20 and _all_finite(state["model"])
    assert state["skipped_steps"] == sum(_skip_counts(run_dir)) > 0


def test_skip_counts_skipped_steps_and_keeps_counting_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    skip = [*DIVERGING, "train.on_nonfinite=skip"]
    first = run_mamlrun(
        "train", *skip, "train.iterations=20", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    counts = _skip_counts(run_dir)
    assert len(counts) == 10 and sum(counts) > 0
    assert re.search(rf"skipped steps \(non-finite\)\s*│\s*{sum(counts)}\b", first.stdout)
    state = _checkpoint(run_dir)
    assert state["skipped_steps"] == sum(counts) and _all_finite(state["model"])
    assert _all_finite(state["optimizer"]["state"])
    for row in read_jsonl(run_dir / "metrics.jsonl"):  # (validation adapts finite weights to
        if row["split"] == "train":  # an overflowing loss: its rows may hold inf)
            assert _all_finite(row), row  # means over the window's finite steps

    run_mamlrun("train", f"resume={run_dir}", "train.iterations=30", cwd=tmp_path)
    counts = _skip_counts(run_dir)
    assert len(counts) == 15 and _checkpoint(run_dir)["skipped_steps"] == sum(counts)


def test_on_nonfinite_takes_stop_or_skip(tmp_path):
    result = run_mamlrun(
        "train", *QUICK, "train.on_nonfinite=ignore", cwd=tmp_path, expect_ok=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "train.on_nonfinite: choose stop or skip, got 'ignore'"
    ), result.stderr[-2000:]
