"""`mamlrun adapt`: the adapted model equals the engines' test-time adaptation, a regression
checkpoint adapts to a CSV of points, and every bad input is one line with exit status 2.

Classification on real Omniglot drawings is in test_folder_dataset.py and test_vision_runs.py."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICK, refused, run_mamlrun
from mamlrun.data.preprocess import Preprocessing
from mamlrun.errors import UserError
from mamlrun.maml.adapt import adapt_model
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import build_model
from mamlrun.maml.objectives import TASK_TYPES
from mamlrun.maml.vmap_engine import VmapEngine
from mamlrun.run.adapt import _read_image
from mamlrun.run.export import export_model, load_program

CONV4 = dict(filters=8, pooling="stride", head="mean", init="authors", head_init="normal")
MLP = dict(hidden=[40, 40], activation="relu", init="torch", batch_norm=True)


@pytest.mark.parametrize("engine", [VmapEngine, Learn2LearnEngine], ids=["vmap", "learn2learn"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_adapted_model_predicts_what_the_engines_adaptation_predicts(engine, task):
    """Evaluation adapts with the engines; `adapt` with a copy of the module: same numbers,
    batch norm on batch statistics included."""
    torch.manual_seed(0)
    if task == "classification":
        model = build_model("conv4", (1, 28, 28), 5, **CONV4)
        support_x, support_y = torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2)
        query_x = torch.rand(15, 1, 28, 28)
        inner_lr = 0.4
    else:
        model = build_model("mlp", (1,), 1, **MLP)
        support_x = torch.linspace(-5, 5, 10).view(-1, 1)
        support_y, query_x, inner_lr = 3 * torch.sin(support_x), torch.rand(30, 1) * 10 - 5, 0.01
    reference = engine(model, inner_lr=inner_lr, task_type=task)
    expected = reference.predictions(support_x, support_y, query_x, [0, 5])
    adapted = adapt_model(model, TASK_TYPES[task][0], inner_lr, support_x, support_y, steps=5)
    with torch.no_grad():
        assert torch.allclose(adapted(query_x), expected[5], atol=1e-5)
        assert torch.allclose(model(query_x), expected[0], atol=1e-5), "the initialization is kept"
        assert not torch.allclose(expected[5], expected[0], atol=1e-3)


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("sinusoid")
    run_dir = tmp_path / "run"
    args = ("train.iterations=3000", *QUICK, "train.log_every=500", "train.val_every=1000")
    run_mamlrun(
        "train", *args, "train.checkpoint_every=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    return run_dir


def _sine(x: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sin(x - 1.0)


def test_a_sinusoid_checkpoint_adapts_to_a_csv_of_points(sinusoid_run, tmp_path):
    """Ten points of a sine the model never saw: after adaptation its predictions on the query
    x values are much closer to that sine; the CSV, the plot and the program agree."""
    x = torch.linspace(-4.5, 4.5, 10)
    support = tmp_path / "points.csv"
    support.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x, _sine(x), strict=True)))
    grid = torch.linspace(-5, 5, 50)
    query = tmp_path / "x.csv"
    query.write_text("".join(f"{a}\n" for a in grid))  # no header: also read
    out = tmp_path / "adapted"
    args = (f"checkpoint={sinusoid_run}", f"support={support}", f"query={query}")
    result = run_mamlrun("adapt", *args, f"adapt.out={out}", cwd=tmp_path)
    with open(out / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["x"]) for row in rows] == pytest.approx(grid.tolist(), abs=1e-5)
    truth = _sine(grid)
    before = torch.tensor([float(row["before"]) for row in rows])
    after = torch.tensor([float(row["after"]) for row in rows])
    mse_before, mse_after = (
        float(((before - truth) ** 2).mean()),
        float(((after - truth) ** 2).mean()),
    )
    assert mse_after < 0.3 * mse_before and mse_after < 1.0, (mse_before, mse_after)
    meta = json.loads((out / "adapted.json").read_text())
    assert meta["steps"] == 10 and meta["support_points"] == 10 and meta["queries"] == 50
    assert meta["support_mse"]["after"] < meta["support_mse"]["before"]
    assert "support MSE" in result.stdout
    assert Image.open(out / "fit.png").info.get("Software") == "mamlrun"
    program = load_program(out / meta["program"])
    with torch.no_grad():
        assert torch.allclose(program(grid.view(-1, 1))[:, 0], after, rtol=1e-4, atol=1e-4)
    printed = subprocess.run(
        [sys.executable, str(out / "predict.py"), *(f"{v}" for v in grid[:3].tolist())],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    assert [float(line.split(",")[1]) for line in printed] == pytest.approx(
        after[:3].tolist(), abs=1e-4
    )
    # without query=: a grid over the training x range; adapt.steps= overrides the test steps
    default = tmp_path / "default"
    run_mamlrun("adapt", *args[:2], "adapt.steps=1", f"adapt.out={default}", cwd=tmp_path)
    meta = json.loads((default / "adapted.json").read_text())
    assert meta["steps"] == 1 and meta["queries"] == 200


def test_bad_points_files_are_one_line(sinusoid_run, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n3,oops\n")
    one = tmp_path / "one.csv"
    one.write_text("1\n2\n")
    for support, message in (
        (bad, "row 2 is '3,oops'; expected 2 numbers per row"),
        (one, "row 1 is '1'; expected 2 numbers per row"),
        (tmp_path / "none.csv", "none.csv: no such CSV file"),
    ):
        line = refused("adapt", f"checkpoint={sinusoid_run}", f"support={support}", cwd=tmp_path)
        assert line.startswith("mamlrun adapt: error: ") and message in line, line


def _image(path: Path, seed: int, mode: str = "L", color: bool = False) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    if not color:
        pixels[..., 1] = pixels[..., 2] = pixels[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode if not color else "RGB").save(path)


@pytest.fixture(scope="module")
def grayscale_run(tmp_path_factory) -> Path:
    """A 3-way grayscale folder model, trained for two iterations (enough to be a checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("gray")
    for c in range(9):
        for i in range(3):
            _image(tmp_path / "data" / f"class{c}" / f"{i}.png", 10 * c + i)
    run_dir = tmp_path / "run"
    run_mamlrun(
        "train",
        "dataset=folder",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.splits={train:3,validation:3,test:3}",
        "dataset.ways=3",
        "dataset.image_size=16",
        "dataset.channels=1",
        "dataset.query_shots=1",
        "algorithm.meta_batch_size=2",
        "algorithm.inner_steps=1",
        "algorithm.test_inner_steps=2",
        "model.filters=4",
        "train.iterations=2",
        *QUICK,
        "train.val_tasks=2",
        "eval.tasks=4",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    return run_dir


def test_bad_support_query_and_checkpoints_are_one_line(grayscale_run, tmp_path):
    support = tmp_path / "support"
    for c in "abc":
        _image(support / c / "1.png", ord(c))
    query = tmp_path / "query"
    _image(query / "q1.png", 1)
    _image(query / "q2.jpg", 2)
    good = (f"checkpoint={grayscale_run}", f"support={support}")
    out = tmp_path / "out"
    ran = run_mamlrun("adapt", *good, f"query={query}", f"adapt.out={out}", cwd=tmp_path)
    assert (
        "Predictions" in ran.stdout
        and len(json.loads((out / "adapted.json").read_text())["classes"]) == 3
    )
    with open(out / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [Path(r["image"]).name for r in rows] == ["q1.png", "q2.jpg"] and "class" not in rows[0]
    assert all(math.isclose(sum(float(r[f"p({c})"]) for c in "abc"), 1, abs_tol=1e-3) for r in rows)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    _image(empty / "b" / "1.png", 0)
    many = tmp_path / "many"
    for c in "abcd":
        _image(many / c / "1.png", ord(c))
    color = tmp_path / "color"
    for c in "ab":
        _image(color / c / "1.png", ord(c), color=c == "b")
    single = tmp_path / "single"
    _image(single / "a" / "1.png", 0)
    labelled = tmp_path / "labelled"
    _image(labelled / "z" / "1.png", 0)
    broken = tmp_path / "broken.pt"
    broken.write_text("not a checkpoint")
    cases = [
        ((f"checkpoint={grayscale_run}", f"support={empty}"), "empty/a: no images"),
        ((f"checkpoint={grayscale_run}", f"support={many}"), "4 classes, but the model was"),
        ((f"checkpoint={grayscale_run}", f"support={single}"), "needs at least two classes"),
        ((f"checkpoint={grayscale_run}", f"support={color}"), "b/1.png: a color image, but"),
        ((*good, f"query={labelled}"), "labelled/z: not a class of the support set (a, b, c)"),
        ((*good, f"query={tmp_path / 'nothing'}"), "no such image file or folder"),
        ((f"checkpoint={broken}", f"support={support}"), "not a readable mamlrun checkpoint"),
        ((f"checkpoint={tmp_path}", f"support={support}"), "no checkpoints/best.pt or"),
        ((*good, "adapt.stepz=3"), "adapt.stepz: unknown key"),
        ((*good, "adapt.steps=-1"), "adapt.steps=-1: give a whole number"),
        ((f"support={support}",), "give checkpoint=..."),
        ((*good, f"adapt.out={grayscale_run}"), "a training run's directory"),
    ]
    for args, message in cases:  # by mamlrun's entry point in this process: no start per case
        line = refused("adapt", *args, cwd=tmp_path)
        assert line.startswith("mamlrun adapt: error: ") and message in line, (args, line)
    converted = tmp_path / "converted"
    run_mamlrun(
        "adapt",
        f"checkpoint={grayscale_run}",
        f"support={color}",
        "adapt.convert=true",
        f"adapt.out={converted}",
        cwd=tmp_path,
    )
    assert (converted / "model.pt2").is_file()


def test_a_grayscale_image_is_refused_by_a_color_model_unless_converted(tmp_path):
    _image(tmp_path / "gray.png", 0, mode="L")
    _image(tmp_path / "gray_as_rgb.png", 0, mode="RGB")  # color mode, equal channels: gray
    color = Preprocessing(size=16, channels=3)
    with pytest.raises(UserError, match="gray.png: a grayscale image, but the model was trained"):
        _read_image(tmp_path / "gray.png", color, convert=False)
    assert _read_image(tmp_path / "gray.png", color, convert=True).shape == (3, 16, 16)
    gray = Preprocessing(size=16, channels=1)
    assert _read_image(tmp_path / "gray_as_rgb.png", gray, convert=False).shape == (1, 16, 16)


class _DataDependent(torch.nn.Module):
    """A branch on a value: torch.export refuses it, TorchScript's trace records the path."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 2 if bool(y.sum() > -1e9) else y


def test_a_model_torch_export_refuses_is_saved_as_torchscript(tmp_path):
    meta = {"task_type": "regression", "checkpoint": "c.pt", "steps": 1, "inner_lr": 0.1}
    model, x = _DataDependent(), torch.linspace(-1, 1, 7).view(-1, 1)
    with pytest.warns(UserWarning, match="torch.export cannot export the model"):
        written = export_model(model, x, tmp_path, {**meta, "support": "points.csv"})
    assert written["program"] == "model.torchscript.pt" and not (tmp_path / "model.pt2").exists()
    with torch.no_grad():
        assert torch.allclose(load_program(tmp_path / written["program"])(x), model(x))
    assert "torch.jit.load" in (tmp_path / "predict.py").read_text()
    assert json.loads((tmp_path / "adapted.json").read_text())["program"] == written["program"]
