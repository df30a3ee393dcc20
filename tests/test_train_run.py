"""End to end: `mamlrun train` as a user runs it must learn and leave every artifact behind."""

import json

import pytest
import torch
from PIL import Image
from wandb_offline import read_wandb_offline

from conftest import QUICK, read_jsonl, run_mamlrun

ITERATIONS = 500


@pytest.fixture(scope="module")
def run_dir(workdir):
    """A short MAML sinusoid run logged to a real offline wandb run.

    The meta learning rate is raised to 0.01 (paper: 0.001) so that a few hundred iterations are
    enough to show adaptation clearly.
    """
    target = workdir / "sinusoid_run"
    run_mamlrun(
        "train",
        *QUICK,
        "logger=wandb",
        f"train.iterations={ITERATIONS}",
        "train.log_every=50",
        "train.val_every=100",
        "train.checkpoint_every=100",
        "train.val_tasks=50",
        "algorithm.meta_lr=0.01",
        "eval.tasks=100",
        f"hydra.run.dir={target}",
        cwd=workdir,
    )
    return target


def test_run_leaves_every_artifact(run_dir):
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "metrics.jsonl",
        "eval.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    for name in ("learning_curves.png", "adaptation.png", "sinusoid_fits.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_metrics_are_logged_on_schedule(run_dir):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["iteration"] for r in train] == list(range(50, ITERATIONS + 1, 50))
    assert [r["iteration"] for r in val] == list(range(100, ITERATIONS + 1, 100))
    assert set(train[0]) == {"iteration", "split", "loss_pre", "loss_post", "skipped_steps"}
    assert {r["skipped_steps"] for r in train} == {0}
    assert {f"mse_step{s}" for s in range(11)} <= set(val[0])


def test_a_few_hundred_iterations_learn_to_adapt(run_dir):
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"][-1]
    assert val["mse_step1"] < 0.7 * val["mse_step0"], val
    assert val["mse_step10"] < 0.5 * val["mse_step0"], val
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1]["loss_post"] < train[0]["loss_post"]


def test_checkpoints_describe_themselves(run_dir):
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert last["iteration"] == ITERATIONS
    assert {"model", "optimizer", "rng", "sampler", "config", "best"} <= set(last)
    assert last["config"]["algorithm"]["meta_lr"] == 0.01
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]
    best_row = min(val, key=lambda r: r["mse_step10"])
    assert best["iteration"] == best_row["iteration"] == last["best"]["iteration"]


def test_eval_json_reports_mean_and_ci_per_step_for_each_k(run_dir):
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["tasks"] == 100 and report["inner_steps"] == 10 and report["metric"] == "mse"
    assert set(report["results"]) == {"K=5", "K=10", "K=20"}
    for result in report["results"].values():
        stats = result["mse"]
        assert len(stats["mean"]) == 11
        for std, ci in zip(stats["std"], stats["ci95"], strict=True):
            assert ci == pytest.approx(1.96 * std / 100**0.5)
    k5, k20 = report["results"]["K=5"]["mse"], report["results"]["K=20"]["mse"]
    assert k20["mean"][10] < k5["mean"][10], "more support points must fit better"


def test_wandb_offline_run_holds_config_and_metrics(run_dir):
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_wandb_offline(run_file)
    assert logged["config"]["algorithm"]["meta_lr"] == 0.01
    assert logged["config"]["train"]["iterations"] == ITERATIONS
    history = {row["_step"]: row for row in logged["history"] if "train/loss_post" in row}
    for row in (r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"):
        assert history[row["iteration"]]["train/loss_post"] == row["loss_post"]
    report = json.loads((run_dir / "eval.json").read_text())
    test_rows = [row for row in logged["history"] if "test/K5/mse_step1" in row]
    assert test_rows[0]["test/K5/mse_step1"] == report["results"]["K=5"]["mse"]["mean"][1]
    images = {
        key.split("/")[1] for row in logged["history"] for key in row if key.startswith("plots/")
    }
    assert {"learning_curves", "sinusoid_fits", "adaptation"} <= images


def test_eval_subcommand_reproduces_the_training_evaluation(run_dir, tmp_path):
    out = tmp_path / "eval_run"
    result = run_mamlrun(
        "eval", f"checkpoint={run_dir}", "eval.tasks=100", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert "K=5" in result.stdout and "±" in result.stdout
    again = json.loads((out / "eval.json").read_text())
    original = json.loads((run_dir / "eval.json").read_text())
    for label in ("K=5", "K=10", "K=20"):
        assert again["results"][label]["mse"]["mean"] == pytest.approx(
            original["results"][label]["mse"]["mean"], rel=1e-6
        )
    assert again["checkpoint"].endswith("best.pt")


def test_bf16_autocast_run_learns_to_adapt(tmp_path):
    """`hardware.precision=bf16` on the CPU: second-order MAML under autocast still learns, by
    the same margins as the float32 run above."""
    run_dir = tmp_path / "bf16"
    args = (f"train.iterations={ITERATIONS}", "train.val_every=100", "train.val_tasks=50")
    args += ("algorithm.meta_lr=0.01", "hardware.precision=bf16")
    run_mamlrun("train", *QUICK, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"][-1]
    assert val["mse_step1"] < 0.7 * val["mse_step0"], val
    assert val["mse_step10"] < 0.5 * val["mse_step0"], val


def test_zero_iterations_evaluate_the_initialization(run_dir, tmp_path):
    """`train.iterations=0`: the untrained network's test table, a baseline for the trained one
    (it used to stop with a missing metrics.jsonl)."""
    target = tmp_path / "untrained"
    args = ("train", *QUICK, "train.iterations=0", "eval.tasks=100", f"hydra.run.dir={target}")
    run_mamlrun(*args, cwd=tmp_path)
    untrained = json.loads((target / "eval.json").read_text())
    trained = json.loads((run_dir / "eval.json").read_text())
    assert untrained["iteration"] == 0 and not (target / "checkpoints").exists()
    before, after = (r["results"]["K=5"]["mse"]["mean"][1] for r in (untrained, trained))
    assert after < 0.7 * before, (before, after)
