"""Omniglot end to end on the real archives (skipped where they are absent), `mamlrun data`, and a
user's own `nn.Module` given by `_target_`, and `mamlrun adapt` on held-out Omniglot characters."""

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    OMNIGLOT,
    QUICK,
    needs_omniglot,
    read_jsonl,
    refused,
    run_mamlrun,
    write_drawings,
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
        (("dataset=imagenet",), "choose from folder, folder_drawings, miniimagenet, omniglot"),
        (("dataset=omniglot", "dataset.wayz=5"), "Could not override 'dataset.wayz'"),
    ):
        assert message in refused("data", "verify", *overrides, cwd=tmp_path)  # in this process
    typo = run_mamlrun("data", "verfy", "dataset=omniglot", cwd=tmp_path, expect_ok=False)
    assert typo.returncode == 2 and "unknown action 'verfy'; usage: mamlrun data" in typo.stderr
    usage = run_mamlrun("data", "prepare", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: mamlrun data {prepare,verify}") and "download" in usage


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory) -> Path:
    """First-order MAML on the real Omniglot, meta-batch 8, 300 iterations on the CPU."""
    tmp_path = tmp_path_factory.mktemp("omniglot")
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
    return run_dir


@needs_omniglot
def test_omniglot_5way_1shot_learns_well_above_chance(omniglot_run, tmp_path):
    """Validation and test accuracy far above the 20% of chance after 300 iterations."""
    run_dir = omniglot_run
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


@needs_omniglot
def test_adapt_classifies_held_out_characters_from_their_raw_pngs(omniglot_run, tmp_path):
    """Characters of the run's test split, written as the official 105x105 PNGs (black ink on
    white): `mamlrun adapt` prepares them as training did (28x28, inverted) and, from 1 drawing
    per character (three tasks) or 5 (the first task's characters), labels their other drawings
    far above the 20% of chance.
    The exported program, called by the exported predict.py in a Python that never imports
    mamlrun, gives the logits of the adapted model in mamlrun and the predictions it printed."""
    from mamlrun.data.omniglot import load_omniglot, omniglot_splits

    characters = load_omniglot(OMNIGLOT).characters
    held_out = [characters[i] for i in omniglot_splits(len(characters))["test"][::20].tolist()]
    accuracies = {}
    for task, (group, shots) in enumerate(((0, 1), (1, 1), (2, 1), (0, 5))):
        support, query = tmp_path / f"support{task}", tmp_path / f"query{task}"
        for character in held_out[5 * group : 5 * group + 5]:
            name = character.replace("/", "_")
            write_drawings(character, support / name, slice(0, shots))
            write_drawings(character, query / name, slice(shots, None))
        out = tmp_path / f"adapted{task}"
        args = (f"checkpoint={omniglot_run}", f"support={support}", f"query={query}")
        run_mamlrun("adapt", *args, f"adapt.out={out}", cwd=tmp_path)
        meta = json.loads((out / "adapted.json").read_text())
        assert meta["steps"] == 3 and meta["preprocessing"]["invert"] is True
        accuracies[task] = meta["accuracy"]
    assert sum(accuracies[t] for t in range(3)) / 3 > 0.45, accuracies
    assert accuracies[3] > max(0.6, accuracies[0]), "5 drawings of the same characters do better"

    images = sorted(query.rglob("*.png"))
    logits, printed = _standalone(out, images, tmp_path)
    expected = _adapted_in_mamlrun(omniglot_run, support, images)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    with open(out / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row[:2] for row in printed] == [[row["image"], row["predicted"]] for row in rows]
    probabilities = torch.tensor([float(row["probability"]) for row in rows])
    assert torch.allclose(logits.softmax(dim=1).max(dim=1).values, probabilities, atol=1e-4)


def _standalone(out: Path, images: list[Path], tmp_path: Path) -> tuple[torch.Tensor, list]:
    """The exported predict.py in fresh Pythons that never import mamlrun: its `predict`'s
    logits, and the rows its command line prints (path, class, probability)."""
    saved, paths = tmp_path / "logits.pt", [str(image) for image in images]
    script = tmp_path / "call.py"
    script.write_text(
        f"import runpy, sys, torch\nfound = runpy.run_path({str(out / 'predict.py')!r})\n"
        f"torch.save(found['predict']({paths!r}), {str(saved)!r})\n"
        "assert 'mamlrun' not in sys.modules\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=300)
    printed = subprocess.run(
        [sys.executable, str(out / "predict.py"), *paths],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    ).stdout
    return torch.load(saved), [line.split(",") for line in printed.splitlines()]


def _adapted_in_mamlrun(run_dir: Path, support: Path, images: list[Path]) -> torch.Tensor:
    """The adapted model's logits computed in this process with mamlrun's own functions."""
    from mamlrun.data.preprocess import Preprocessing
    from mamlrun.maml.adapt import adapt_model
    from mamlrun.maml.objectives import TASK_TYPES
    from mamlrun.run import rundir
    from mamlrun.run.adapt import read_support
    from mamlrun.run.build import load_trained, model_for

    path, payload, config = load_trained(run_dir, trusted=False)
    model = model_for(config.model, config.dataset)
    rundir.load_weights(model, payload, path)
    prep = Preprocessing.from_dict(payload["preprocessing"])
    x, y, names, _ = read_support(support, config.dataset.ways, prep, convert=False)
    loss = TASK_TYPES["classification"][0]
    adapted = adapt_model(model, loss, config.algorithm.inner_lr, x.float() / 255, y, 3)
    query = torch.stack([torch.from_numpy(prep.read(image)) for image in images])
    with torch.no_grad():
        return adapted(query.float() / 255)[:, : len(names)]


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
