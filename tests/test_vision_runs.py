"""Omniglot end to end on the real archives (skipped where they are absent), `mamlrun data`, and a
user's own `nn.Module` given by `_target_`."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK, read_jsonl, run_mamlrun

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file(),
    reason=f"the real Omniglot archives are not in {OMNIGLOT}",
)


@needs_omniglot
def test_data_verify_reports_the_papers_split(tmp_path):
    result = run_mamlrun(
        "data", "verify", "dataset=omniglot", f"dataset.root={OMNIGLOT}", cwd=tmp_path
    )
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "1100" in rows["train"] and "100" in rows["validation"] and "423" in rows["test"]
    assert "md5" in result.stderr and "is not the official" in result.stderr


def test_data_verify_names_the_missing_file(tmp_path):
    result = run_mamlrun(
        "data",
        "verify",
        "dataset=omniglot",
        f"dataset.root={tmp_path}",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 2 and "images_background" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_refuses_what_hydra_cannot_compose_in_one_line(tmp_path):
    for overrides, message in (
        (("dataset=imagenet",), "choose from miniimagenet, omniglot, sinusoid"),
        (("dataset=omniglot", "dataset.wayz=5"), "Could not override 'dataset.wayz'"),
    ):
        result = run_mamlrun("data", "verify", *overrides, cwd=tmp_path, expect_ok=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    typo = run_mamlrun("data", "verfy", "dataset=omniglot", cwd=tmp_path, expect_ok=False)
    assert typo.returncode == 2 and "unknown action 'verfy'; usage: mamlrun data" in typo.stderr
    usage = run_mamlrun("data", "prepare", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: mamlrun data {prepare,verify}") and "download" in usage


@needs_omniglot
def test_omniglot_5way_1shot_learns_well_above_chance(tmp_path):
    """First-order MAML, meta-batch 8, 300 iterations on CPU: validation accuracy far above 20%."""
    run_dir = tmp_path / "omniglot"
    run_mamlrun(
        "train",
        "dataset=omniglot",
        f"dataset.root={OMNIGLOT}",
        "algorithm=fomaml",
        "algorithm.meta_batch_size=8",
        "train.iterations=300",
        *QUICK,
        "train.log_every=50",
        "train.val_every=100",
        "train.val_tasks=50",
        "train.checkpoint_every=100",
        "eval.tasks=100",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]
    assert val[-1]["acc_step0"] < 0.35, "before adaptation a new task is at chance"
    assert max(r["acc_step3"] for r in val) > 0.45
    report = json.loads((run_dir / "eval.json").read_text())
    result = report["results"]["5-way 1-shot"]["acc"]
    assert report["inner_steps"] == 3 and len(result["mean"]) == 4
    assert result["mean"][3] > 0.4 and result["mean"][3] > result["mean"][0] + 0.15
    assert (run_dir / "adaptation.png").is_file() and not (run_dir / "sinusoid_fits.png").exists()

    # evaluated where the data lives elsewhere: the same test tasks, the same numbers
    moved = tmp_path / "moved"
    moved.mkdir()
    for archive in ("images_background.zip", "images_evaluation.zip"):
        (moved / archive).symlink_to(OMNIGLOT / archive)
    again = tmp_path / "again"
    args = (f"checkpoint={run_dir}", "logger=none", "eval.tasks=100", f"hydra.run.dir={again}")
    run_mamlrun("eval", *args, f"data_root={moved}", cwd=tmp_path)
    assert json.loads((again / "eval.json").read_text())["results"] == report["results"]
    args = (f"checkpoint={run_dir}", "logger=none", f"data_root={tmp_path / 'none'}")
    missing = run_mamlrun("eval", *args, cwd=tmp_path, expect_ok=False)
    assert missing.returncode == 2 and "images_background" in missing.stderr


def test_any_module_given_by_target_trains(tmp_path):
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "linear.yaml").write_text(
        "_target_: torch.nn.Linear\nin_features: 1\nout_features: 1\n"
    )
    run_dir = tmp_path / "run"
    run_mamlrun(
        "train",
        "model=linear",
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        "train.iterations=10",
        *QUICK,
        "eval.plot_tasks=1",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["results"]["K=5"]["mse"]["mean"][0] > 0


def _mini_split(path: Path, classes: int, per_class: int, seed: int) -> None:
    """A miniImageNet split in learn2learn's pickle format, with random pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (classes * per_class, 84, 84, 3), dtype=np.uint8)
    class_dict = {
        f"n{c:08d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)
    }
    path.write_bytes(pickle.dumps({"image_data": images, "class_dict": class_dict}))


@pytest.mark.parametrize(
    ("compiled", "precision"),
    [(True, "fp32"), (False, "fp32"), (True, "bf16")],
    ids=["compiled", "eager", "bf16"],
)
def test_miniimagenet_trains_end_to_end_on_the_cpu_with_a_hint_about_the_engine(
    tmp_path, compiled, precision
):
    """The miniImageNet pipeline from pickles to eval.json (images are random: no learning is
    asserted), with batch norm compiled (the CPU default) or eager, or under bf16 autocast."""
    root = tmp_path / "mini"
    root.mkdir()
    for split, classes, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 20, 2)):
        _mini_split(root / f"mini-imagenet-cache-{split}.pkl", classes, per_class=3, seed=seed)
    run_dir = tmp_path / "run"
    result = run_mamlrun(
        "train",
        "dataset=miniimagenet",
        f"dataset.root={root}",
        "dataset.query_shots=1",
        "dataset.test_query_shots=1",
        "algorithm.meta_batch_size=2",
        "algorithm.inner_steps=1",
        "algorithm.test_inner_steps=2",
        "train.iterations=2",
        *QUICK,
        "train.val_tasks=2",
        "eval.tasks=4",
        f"hydra.run.dir={run_dir}",
        f"hardware.compile={str(compiled).lower()}",
        f"hardware.precision={precision}",
        cwd=tmp_path,
    )
    assert "No CUDA runtime" not in result.stderr  # Inductor's set-up log stays quiet
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    accuracy = next(iter(results.values()))["acc"]["mean"]
    assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)
    train_rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train_rows and train_rows[-1]["iteration"] == 2
