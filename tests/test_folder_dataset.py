"""`dataset=folder`: a user's own image folder. Layouts, splits, mixed image files, the cache,
every bad input as one line before any work, and a real meta-training run on Omniglot drawings
written as a folder of PNGs, which must learn and whose checkpoint `mamlrun adapt` then uses."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    OMNIGLOT,
    QUICK,
    needs_omniglot,
    omniglot_characters,
    read_jsonl,
    refused,
    run_mamlrun,
    write_drawings,
)
from mamlrun.data.folder import check_tasks, load_folder, scan_folder
from mamlrun.data.preprocess import Preprocessing
from mamlrun.errors import UserError

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


def _image(path: Path, seed: int, size=(30, 20), mode="RGB") -> None:
    """A random image of this size and PIL mode, saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _classes(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            _image(root / name / f"{i:03d}{suffix}", seed=100 * c + i)
    return root


def test_classes_are_split_by_the_seed_and_counts_or_fractions(tmp_path):
    root = _classes(tmp_path / "data", {f"class{c:02d}": 3 for c in range(10)})
    listing = scan_folder(root, FRACTIONS, split_seed=1)
    sizes = {split: len(classes) for split, classes in listing.splits.items()}
    assert listing.layout == "classes" and sizes == {"train": 6, "validation": 2, "test": 2}
    names = [name for classes in listing.splits.values() for name, _ in classes]
    assert sorted(names) == [f"class{c:02d}" for c in range(10)], "each class in one split"
    assert scan_folder(root, FRACTIONS, split_seed=1).splits == listing.splits
    assert scan_folder(root, FRACTIONS, split_seed=2).splits != listing.splits
    counted = scan_folder(root, {"train": 5, "validation": 2, "test": 1}, split_seed=1)
    assert [len(classes) for classes in counted.splits.values()] == [5, 2, 1]


def test_given_split_folders_are_used_as_they_are(tmp_path):
    root = tmp_path / "data"
    for split, classes in (("train", "abc"), ("val", "d"), ("test", "ef")):
        _classes(root / split, {name: 2 for name in classes})
    listing = scan_folder(root, FRACTIONS, split_seed=1)
    assert listing.layout == "splits"
    assert {s: [n for n, _ in c] for s, c in listing.splits.items()} == {
        "train": ["a", "b", "c"],
        "validation": ["d"],
        "test": ["e", "f"],
    }
    (root / "test").rename(root / "testing")
    with pytest.raises(UserError, match=r"data/testing: not a split folder; the root/\{train,"):
        scan_folder(root, FRACTIONS, split_seed=1)
    (root / "testing").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"data/test: not found; the root/\{train,val,test\}/"):
        scan_folder(root, FRACTIONS, split_seed=1)


def test_any_size_and_mode_is_resized_hidden_and_other_files_skipped_and_cached(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MAMLRUN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for c in range(5):
        _image(root / f"c{c}" / "big.jpg", c, size=(300, 200))
        _image(root / f"c{c}" / "gray.png", c + 10, mode="L")
        _image(root / f"c{c}" / "alpha.png", c + 20, mode="RGBA")
        _image(root / f"c{c}" / "nested" / "palette.gif", c + 30, mode="P")
        (root / f"c{c}" / "notes.txt").write_text("not an image")
        _image(root / f"c{c}" / ".hidden.png", c + 40)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    listing = scan_folder(root, {"train": 3, "validation": 1, "test": 1}, split_seed=0)
    assert all(len(images) == 4 for classes in listing.splits.values() for _, images in classes)
    prep = Preprocessing(size=16, channels=3)
    loaded = load_folder(listing, prep)
    assert loaded["train"].images.shape == (12, 3, 16, 16)
    assert (
        loaded["train"].images.dtype == torch.uint8 and loaded["train"].counts.tolist() == [4] * 3
    )
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing written there"
    (cached,) = (tmp_path / "cache").glob("folder-*.pt")
    again = load_folder(listing, prep)
    assert torch.equal(again["test"].images, loaded["test"].images)
    assert len(list((tmp_path / "cache").glob("folder-*.pt"))) == 1
    gray = load_folder(listing, Preprocessing(size=16, channels=1, invert=True))
    assert gray["train"].images.shape == (12, 1, 16, 16), "another preprocessing, another entry"
    assert len(list((tmp_path / "cache").glob("folder-*.pt"))) == 2 and cached.is_file()


def test_task_shapes_the_folder_cannot_serve_name_the_class_or_split(tmp_path):
    root = _classes(tmp_path / "data", {"a": 5, "b": 5, "c": 2, "d": 5, "e": 5})
    listing = scan_folder(root, {"train": 3, "validation": 1, "test": 1}, split_seed=0)
    with pytest.raises(UserError, match=r"dataset.ways=2 but the validation split of .* has 1 "):
        check_tasks(listing, ways=2, shots=1, train_queries=1, eval_queries=1)
    small = next(n for s in listing.splits.values() for n, images in s if len(images) == 2)
    with pytest.raises(UserError, match=rf"data/{small}: 2 images, but a task of the"):
        check_tasks(listing, ways=1, shots=1, train_queries=2, eval_queries=2)


# A 2-iteration run on a folder, small images and tasks.
TRAIN = [
    "dataset=folder",
    "dataset.image_size=16",
    "dataset.query_shots=1",
    "algorithm.meta_batch_size=2",
    "algorithm.inner_steps=1",
    "algorithm.test_inner_steps=1",
    "train.iterations=2",
    *QUICK,
    "train.val_tasks=2",
    "eval.tasks=4",
]


def _train(*args: str, cwd: Path, expect_ok: bool = True):
    return run_mamlrun("train", *TRAIN, *args, cwd=cwd, expect_ok=expect_ok)


@pytest.mark.parametrize(
    "choice",
    [
        ("algorithm.engine=learn2learn", "dataset.sampler=learn2learn"),
        ("algorithm.engine=vmap", "dataset.sampler=tensor", "dataset.rotations=true"),
        ("model=flat_linear",),
    ],
    ids=["learn2learn", "vmap-tensor-rotations", "target-model"],
)
def test_both_engines_both_samplers_and_any_module_run_on_a_folder(tmp_path, choice):
    """Classes of 3 to 6 images of mixed sizes; a `_target_` model sized by the user."""
    root = tmp_path / "data"
    for c in range(9):
        for i in range(3 + c % 4):
            _image(root / f"class{c}" / f"{i}.png", 10 * c + i, size=(20 + 7 * i, 24))
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "flat_linear.yaml").write_text(
        "_target_: torch.nn.Sequential\n_args_:\n  - _target_: torch.nn.Flatten\n"
        "  - _target_: torch.nn.Linear\n    in_features: 768\n    out_features: 3\n"
    )
    run_dir = tmp_path / "run"
    _train(
        f"dataset.root={root}",
        "dataset.splits={train:3,validation:3,test:3}",
        "dataset.ways=3",
        *choice,
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    accuracy = json.loads((run_dir / "eval.json").read_text())["results"]["3-way 1-shot"]["acc"]
    assert len(accuracy["mean"]) == 2 and all(0 <= a <= 1 for a in accuracy["mean"])


def test_bad_folders_fail_in_one_line_before_any_work(tmp_path):
    root = _classes(tmp_path / "data", {f"c{c:02d}": 3 for c in range(12)})
    (root / "c03" / "000.png").unlink()
    (root / "c03" / "000.png").write_bytes(b"\x89PNG truncated")
    counts = "dataset.splits={train:6,validation:3,test:3}"
    cases = [
        ((), "dataset.root: required; pass dataset.root=<value>"),
        ((f"dataset.root={tmp_path / 'nowhere'}",), "nowhere: not a folder"),
        ((f"dataset.root={root}", "dataset.ways=4", counts), "dataset.ways=4 but the validation"),
        ((f"dataset.root={root}", "dataset.shots=3", counts), "c0"),
        ((f"dataset.root={root}", "dataset.channels=2"), "dataset.channels: choose 1"),
        ((f"dataset.root={root}", "dataset.splits={train:0.5,validation:0.1,test:0.1}"), "sum"),
        ((f"dataset.root={root}", "dataset.image_size=8"), "dataset.image_size: must be in"),
        ((f"dataset.root={root}", counts, "dataset.ways=2"), "c03/000.png: cannot read"),
    ]
    run_dir = tmp_path / "run"
    for args, message in cases:  # by mamlrun's entry point in this process: no start per case
        line = refused("train", *TRAIN, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert message in line, (args, line)
        assert not (run_dir / "checkpoints").exists()
    shots = _train(f"dataset.root={root}", "dataset.shots=3", counts, cwd=tmp_path, expect_ok=False)
    assert "3 images, but a task of the train split" in shots.stderr
    assert "dataset.shots + dataset.query_shots = 4 per class" in shots.stderr


@needs_omniglot
def test_folder_drawings_prepares_omniglot_pngs_as_the_omniglot_loader_does(tmp_path):
    """Nine characters' raw PNGs written as a folder (given train/val/test folders) and read as
    `dataset=folder_drawings` prepares them are, pixel for pixel, the images of mamlrun's
    Omniglot loader: the preset trains on a user's drawings what the paper's Omniglot runs
    train on (which tests/test_vision_runs.py shows to learn)."""
    from mamlrun.config.compose import compose_config
    from mamlrun.config.validate import validate
    from mamlrun.data.omniglot import load_omniglot
    from mamlrun.run.build import preprocessing_for

    data = load_omniglot(OMNIGLOT)
    picked = data.characters[::180][:9]  # both sets, many alphabets
    root, folders = tmp_path / "drawings", {}
    for number, character in enumerate(picked):
        split = ("train", "val", "test")[number // 3]
        folders[character.replace("/", "_")] = data.images[data.characters.index(character)]
        write_drawings(character, root / split / character.replace("/", "_"))
    dataset = validate(compose_config(["dataset=folder_drawings", f"dataset.root={root}"])).dataset
    listing = scan_folder(root, dataset.splits, dataset.split_seed)
    loaded = load_folder(listing, preprocessing_for(dataset), cache_dir=tmp_path / "cache")
    seen = []
    for images in loaded.values():
        for index, name in enumerate(images.names):
            start, count = int(images.starts[index]), int(images.counts[index])
            assert torch.equal(images.images[start : start + count, 0], folders[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(folders)


@needs_omniglot
def test_a_folder_of_omniglot_pngs_meta_trains_well_above_chance_and_adapts(tmp_path):
    """120 background-set characters as a folder: first-order MAML for 100 iterations learns
    5-way 1-shot far above the 20% of chance; `mamlrun adapt` then classifies five characters of
    the evaluation set it never saw, from five drawings each."""
    root = tmp_path / "drawings"
    for character in list(omniglot_characters("images_background.zip"))[:120]:
        write_drawings(character, root / character.split("/", 1)[1].replace("/", "_"))
    run_dir = tmp_path / "run"
    run_mamlrun(
        "train",
        "dataset=folder",
        f"dataset.root={root}",
        "dataset.image_size=28",
        "dataset.channels=1",
        "dataset.invert=true",
        "dataset.query_shots=1",
        "model=conv4_omniglot",
        "algorithm=fomaml",
        "algorithm.inner_lr=0.4",
        "algorithm.inner_steps=1",
        "algorithm.test_inner_steps=3",
        "~algorithm.grad_clip",
        "algorithm.meta_batch_size=8",
        "train.iterations=100",  # measured: validation at 62% after 3 steps, test at 55%
        *QUICK,
        "train.log_every=50",
        "train.val_every=50",
        "train.val_tasks=50",
        "train.checkpoint_every=50",
        "eval.tasks=100",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    report = json.loads((run_dir / "eval.json").read_text())
    accuracy = report["results"]["5-way 1-shot"]["acc"]["mean"]
    assert report["dataset"] == "folder" and accuracy[0] < 0.3 and accuracy[3] > 0.45
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]
    assert max(r["acc_step3"] for r in val) > 0.45
    payload = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert payload["preprocessing"] == {
        "size": 28,
        "channels": 1,
        "invert": True,
        "resample": "LANCZOS",
    }

    support, query = tmp_path / "support", tmp_path / "query"
    for character in list(omniglot_characters("images_evaluation.zip"))[3:600:130]:
        name = "_".join(character.split("/")[1:])  # five characters of five alphabets
        write_drawings(character, support / name, slice(0, 5))
        write_drawings(character, query / name, slice(5, None))
    out = tmp_path / "adapted"
    result = run_mamlrun(
        "adapt",
        f"checkpoint={run_dir}",
        f"support={support}",
        f"query={query}",
        f"adapt.out={out}",
        cwd=tmp_path,
    )
    meta = json.loads((out / "adapted.json").read_text())
    assert meta["queries"] == 75 and meta["accuracy"] > 0.6, result.stdout
    assert f"accuracy {meta['accuracy']:.2%} on 75 labelled queries" in result.stdout
