"""Determinism, resume equivalence and Hydra multirun sweeps, through the console script."""

import torch
from wandb_offline import read_wandb_offline

from conftest import QUICK, read_jsonl, run_mamlrun

SHORT = [*QUICK, "train.eval_at_end=false", "algorithm.meta_batch_size=5"]


def _final_state(run_dir):
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)


def test_same_seed_same_metrics_and_resume_equals_an_uninterrupted_run(tmp_path):
    whole, again, split = tmp_path / "whole", tmp_path / "again", tmp_path / "split"
    run_mamlrun("train", *SHORT, "train.iterations=30", f"hydra.run.dir={whole}", cwd=tmp_path)
    run_mamlrun("train", *SHORT, "train.iterations=30", f"hydra.run.dir={again}", cwd=tmp_path)
    # An interrupted run: stops after 20 iterations, then continues to 30 from last.pt.
    run_mamlrun("train", *SHORT, "train.iterations=20", f"hydra.run.dir={split}", cwd=tmp_path)
    resumed = run_mamlrun(
        "train", "resume=" + str(split), "train.iterations=30", *SHORT[:1], cwd=tmp_path
    )
    assert "resuming" in resumed.stdout and "from iteration 20" in resumed.stdout

    assert not (whole / "wandb").exists(), "logger=none must not touch wandb"
    reference = read_jsonl(whole / "metrics.jsonl")
    assert read_jsonl(again / "metrics.jsonl") == reference
    assert read_jsonl(split / "metrics.jsonl") == reference
    final = _final_state(whole)
    for other in (again, split):
        state = _final_state(other)
        assert state["iteration"] == 30
        for name, tensor in final["model"].items():
            assert torch.equal(state["model"][name], tensor), name
    # The resumed run kept its own config files rather than the resume command's.
    assert "train.iterations=20" in (split / ".hydra/overrides.yaml").read_text()


def test_resume_refuses_to_change_what_defines_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_mamlrun("train", *SHORT, "train.iterations=10", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    result = run_mamlrun(
        "train", f"resume={run_dir}", "algorithm.inner_lr=0.5", cwd=tmp_path, expect_ok=False
    )
    assert result.returncode == 2 and "algorithm.inner_lr=0.5" in result.stderr
    assert _final_state(run_dir)["iteration"] == 10, "the checkpoint must be left as it was"


def test_multirun_sweeps_algorithm_and_seed(tmp_path):
    result = run_mamlrun(
        "train",
        "-m",
        "algorithm=maml,fomaml",
        "seed=1,2",
        *QUICK,
        "train.iterations=10",
        "eval.tasks=10",
        "eval.plot_tasks=0",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "outputs/multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"], result.stdout[-2000:]
    seen = set()
    for job in jobs:
        state = _final_state(job)
        seen.add((state["config"]["algorithm"]["name"], state["config"]["seed"]))
        assert (job / "eval.json").is_file() and (job / "metrics.jsonl").is_file()
    assert seen == {("maml", 1), ("maml", 2), ("fomaml", 1), ("fomaml", 2)}
    losses = {
        tuple(r["loss_post"] for r in read_jsonl(j / "metrics.jsonl") if r["split"] == "train")
        for j in jobs
    }
    assert len(losses) == 4, "different algorithms and seeds must give different runs"


def test_a_bad_job_ends_only_itself_and_the_sweep_exits_2(tmp_path):
    result = run_mamlrun(
        "train",
        "-m",
        "model=conv4_omniglot,mlp",  # conv4 on sinusoid is refused by validation
        *QUICK,
        "train.iterations=10",
        "eval.tasks=10",
        "eval.plot_tasks=0",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error in job 0 (model=conv4_omniglot" in result.stderr
    assert "needs an image dataset" in result.stderr and "Traceback" not in result.stderr
    assert "sweep job(s) 0 failed" in result.stderr.splitlines()[-1]
    (sweep,) = (tmp_path / "outputs/multirun").iterdir()
    assert (sweep / "1" / "eval.json").is_file(), "the job after the bad one still ran"


def test_the_runs_of_one_sweep_are_one_wandb_group(tmp_path):
    """Offline W&B runs read back: jobs that differ in their algorithm share the sweep's group."""
    quick = [arg for arg in SHORT if arg != "logger=none"]
    sweep = tmp_path / "multirun" / "my-sweep"
    args = ["algorithm=maml,fomaml", "train.iterations=10", "logger=wandb", "logger.mode=offline"]
    run_mamlrun("train", "-m", *quick, *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = [read_wandb_offline(f) for f in sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))]
    assert len(runs) == 2
    assert {run["group"] for run in runs} == {"multirun/my-sweep"}
    assert sorted(run["name"] for run in runs) == [
        "sinusoid-fomaml-seed0-job1",
        "sinusoid-maml-seed0-job0",
    ]
