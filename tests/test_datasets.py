"""Dataset loaders: Omniglot (zip, folders, torchvision layout, cache, errors), class splits, and
miniImageNet (learn2learn pickles, raw images + csvs).

Most tests build tiny synthetic datasets in tmp_path; the real Omniglot archives are used when
present (../shared/data/omniglot, or $MAMLRUN_OMNIGLOT_ROOT).
"""

import io
import os
import pickle
import random
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mamlrun.data import omniglot, preprocess
from mamlrun.data.files import download_file, file_md5
from mamlrun.data.miniimagenet import load_miniimagenet
from mamlrun.data.omniglot import (
    OMNIGLOT_MD5,
    OMNIGLOT_SETS,
    _OmniglotSet,
    load_omniglot,
    omniglot_splits,
)
from mamlrun.errors import UserError

# ---------------------------------------------------------------------------------------------
# A tiny synthetic Omniglot: set -> alphabet -> characters; 3 drawings per character
# ---------------------------------------------------------------------------------------------

ALPHABETS = {"images_background": {"Zeta": 2, "Alpha": 1}, "images_evaluation": {"Beta": 2}}
DRAWINGS = 3
COUNTS = {"images_background": (2, 3, DRAWINGS), "images_evaluation": (1, 2, DRAWINGS)}
CHARACTERS = [
    "images_background/Alpha/character01",
    "images_background/Zeta/character01",
    "images_background/Zeta/character02",
    "images_evaluation/Beta/character01",
    "images_evaluation/Beta/character02",
]


def _background(data) -> int:
    """Characters that come from images_background (listed first)."""
    return sum(name.startswith("images_background/") for name in data.characters)


def _drawing(seed: int) -> bytes:
    """A 105x105 mode "1" PNG like Omniglot's: white background, black ink (a block + specks)."""
    ink = np.random.default_rng(seed).random((105, 105)) < 0.05
    ink[40:65, 40:65] = True
    buffer = io.BytesIO()
    Image.fromarray(~ink).save(buffer, format="PNG")  # bool array -> mode "1", True = white
    return buffer.getvalue()


def _entries(name: str) -> dict[str, bytes]:
    """Zip member name -> PNG bytes of one synthetic set, with the official naming scheme."""
    entries, character = {}, 0 if name == "images_background" else 100
    for alphabet, characters in ALPHABETS[name].items():
        for c in range(1, characters + 1):
            character += 1
            for d in range(1, DRAWINGS + 1):
                member = f"{name}/{alphabet}/character{c:02d}/{character:04d}_{d:02d}.png"
                entries[member] = _drawing(100 * character + d)
    return entries


def _write_zips(directory: Path, drop: str | None = None) -> Path:
    """Both synthetic archives in `directory` (entries in reverse order: loaders must sort)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in OMNIGLOT_SETS:
        with zipfile.ZipFile(directory / f"{name}.zip", "w") as archive:
            for member, data in reversed(_entries(name).items()):
                if member != drop:
                    archive.writestr(member, data)
    return directory


def _extract(zips: Path, directory: Path) -> Path:
    for name in OMNIGLOT_SETS:
        with zipfile.ZipFile(zips / f"{name}.zip") as archive:
            archive.extractall(directory)
    return directory


def _reference(png: bytes) -> np.ndarray:
    """The documented preprocessing, spelled out: L, 28x28 LANCZOS, inverted."""
    image = Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return 255 - np.asarray(image)


@pytest.fixture
def zips(tmp_path):
    return _write_zips(tmp_path / "data")


def _load(root, cache, **kwargs):
    return load_omniglot(root, cache_dir=cache, expected_counts=COUNTS, **kwargs)


def test_omniglot_from_zips_shape_order_and_inversion(zips, tmp_path):
    data = _load(zips, tmp_path / "cache")
    assert data.images.shape == (5, DRAWINGS, 28, 28) and data.images.dtype == torch.uint8
    assert data.characters == CHARACTERS and _background(data) == 3
    # row 1 is Zeta/character01 (written first, sorted after Alpha); column 1 its 2nd drawing
    entries = _entries("images_background")
    member = "images_background/Zeta/character01/0001_02.png"
    np.testing.assert_array_equal(data.images[1, 1].numpy(), _reference(entries[member]))
    assert data.images[:, :, 12:16, 12:16].min() > 200  # the ink block is high after inversion
    assert data.images.float().mean() < 60  # mostly background = low


def test_omniglot_folders_and_torchvision_layout_match_zips(zips, tmp_path):
    expected = _load(zips, tmp_path / "cache0")
    layouts = {
        "folders": _extract(zips, tmp_path / "folders"),
        "torchvision": _extract(zips, tmp_path / "tv" / "omniglot-py").parent,
        "parent of omniglot/": _write_zips(tmp_path / "parent" / "omniglot").parent,
        "zips in omniglot-py/": _write_zips(tmp_path / "tvzip" / "omniglot-py").parent,
    }
    for i, (layout, root) in enumerate(layouts.items()):
        data = _load(root, tmp_path / f"cache{i + 1}")
        assert torch.equal(data.images, expected.images), layout
        assert data.characters == expected.characters, layout


def test_omniglot_cache_is_created_reused_and_keyed_by_source(zips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _load(zips, cache)
    files = list(cache.glob("omniglot-*.pt"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))

    def no_decoding(self, member):
        raise AssertionError("decoded an image although the cache holds the tensor")

    with monkeypatch.context() as patch:
        patch.setattr(_OmniglotSet, "read", no_decoding)
        assert torch.equal(_load(zips, cache).images, first.images)
    os.utime(zips / "images_evaluation.zip", ns=(1, 1))  # a changed source gets a new cache file
    _load(zips, cache)
    assert len(list(cache.glob("omniglot-*.pt"))) == 2


def test_omniglot_default_cache_is_per_user_not_next_to_the_data(zips, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_CACHE", str(tmp_path / "user-cache"))
    _load(zips, None)
    assert len(list((tmp_path / "user-cache").glob("omniglot-*.pt"))) == 1
    assert not list(zips.glob(".*cache*")), "nothing may be written into the data folder"


def test_omniglot_missing_archive_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"images_background\.zip: not found.*download=true"):
        _load(tmp_path, tmp_path / "cache")
    _write_zips(tmp_path / "one")
    (tmp_path / "one" / "images_evaluation.zip").unlink()
    with pytest.raises(UserError, match=r"one/images_evaluation\.zip: not found"):
        _load(tmp_path / "one", tmp_path / "cache")


def test_omniglot_broken_archives(zips, tmp_path):
    (zips / "images_evaluation.zip").write_bytes(b"<html>not a zip</html>")
    with pytest.raises(UserError, match=r"images_evaluation\.zip: not a readable zip.*delete it"):
        _load(zips, tmp_path / "cache")

    damaged = _write_zips(tmp_path / "damaged")
    with zipfile.ZipFile(damaged / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Alpha/character01/0003_04.png", b"not a png")
    counts = {**COUNTS, "images_background": (2, 3, 4)}
    with pytest.raises(UserError, match=r"expected 4 drawings of Zeta/character01"):
        load_omniglot(damaged, cache_dir=tmp_path / "cache", expected_counts=counts)
    alpha_only = {**COUNTS, "images_background": (1, 1, 4)}
    with pytest.raises(UserError, match=r"expected 1 alphabets in images_background"):
        load_omniglot(damaged, cache_dir=tmp_path / "cache", expected_counts=alpha_only)


def test_omniglot_unreadable_drawing_names_the_member(tmp_path):
    root = _write_zips(tmp_path / "data")
    with zipfile.ZipFile(root / "images_evaluation.zip", "w") as archive:
        for member, data in _entries("images_evaluation").items():
            archive.writestr(member, data[:40])  # truncated PNGs
    with pytest.raises(UserError, match=r"cannot read images_evaluation/Beta/character01/.*png"):
        _load(root, tmp_path / "cache")


def test_omniglot_incomplete_archive(tmp_path):
    root = _write_zips(tmp_path / "data", drop="images_background/Alpha/character01/0003_01.png")
    counts = {**COUNTS, "images_background": (2, 4, DRAWINGS)}
    with pytest.raises(UserError, match=r"expected 4 characters in images_background.*found 3"):
        load_omniglot(root, cache_dir=tmp_path / "cache", expected_counts=counts)
    with pytest.raises(UserError, match=r"expected 3 drawings of Alpha/character01.*found 2"):
        _load(root, tmp_path / "cache")


def test_omniglot_md5_mismatch_only_warns(zips, tmp_path, monkeypatch):
    """With the official counts (patched to the synthetic ones) zips are md5-checked: warn, load."""
    monkeypatch.setattr(omniglot, "OMNIGLOT_COUNTS", COUNTS)
    with pytest.warns(
        UserWarning, match=r"images_(background|evaluation)\.zip: md5 .* not the official"
    ):
        data = load_omniglot(zips, cache_dir=tmp_path / "cache")
    assert data.images.shape[0] == 5


def test_download_file_is_atomic_and_checks_md5(zips, tmp_path):
    source = zips / "images_background.zip"
    url = source.resolve().as_uri()  # file:// : urllib without the network
    target = tmp_path / "down" / "a.zip"
    with pytest.raises(UserError, match="md5"):
        download_file(url, target, md5="0" * 32)
    assert not target.exists() and not list(target.parent.iterdir())
    download_file(url, target, md5=file_md5(source))
    assert target.read_bytes() == source.read_bytes() and len(list(target.parent.iterdir())) == 1
    with pytest.raises(UserError, match="download failed"):
        download_file((tmp_path / "absent.zip").as_uri(), target)


def test_omniglot_download_when_missing(zips, tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "OMNIGLOT_URL", f"{zips.resolve().as_uri()}/{{}}.zip")
    md5 = {name: file_md5(zips / f"{name}.zip") for name in OMNIGLOT_SETS}
    monkeypatch.setattr(omniglot, "OMNIGLOT_MD5", md5)
    root = tmp_path / "empty"
    root.mkdir()
    data = _load(root, tmp_path / "cache", download=True)
    assert data.characters == CHARACTERS
    assert sorted(p.name for p in root.glob("*.zip")) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]


# ---------------------------------------------------------------------------------------------
# The real archives
# ---------------------------------------------------------------------------------------------

REAL_OMNIGLOT = Path(
    os.environ.get("MAMLRUN_OMNIGLOT_ROOT", Path(__file__).parents[2] / "shared/data/omniglot")
)
needs_real = pytest.mark.skipif(
    not (REAL_OMNIGLOT / "images_background.zip").is_file(),
    reason=f"the Omniglot archives are not in {REAL_OMNIGLOT} (set MAMLRUN_OMNIGLOT_ROOT)",
)


@pytest.fixture(scope="session")
def real_omniglot(tmp_path_factory):
    """One preprocessing of the real archives per session (about 10 s), cached in a tmp dir."""
    cache = tmp_path_factory.mktemp("omniglot-cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        data = load_omniglot(REAL_OMNIGLOT, cache_dir=cache)
        seconds = time.perf_counter() - start
    return data, cache, seconds, [str(w.message) for w in caught]


@needs_real
def test_real_omniglot(real_omniglot):
    data, _, _, _ = real_omniglot
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == torch.uint8
    assert _background(data) == 964 and len(data.characters) == 1623
    assert data.characters[963].startswith("images_background/")
    assert data.characters[964] == "images_evaluation/Angelic/character01"
    assert 5 < data.images.float().mean() < 60  # ink (high) is the minority of pixels


@needs_real
def test_real_omniglot_md5_mismatch_warns_and_cache_is_fast(real_omniglot):
    data, cache, _, messages = real_omniglot
    official = (
        file_md5(REAL_OMNIGLOT / "images_background.zip") == OMNIGLOT_MD5["images_background"]
    )
    assert official or any("md5" in m and "images_background.zip" in m for m in messages)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_omniglot(REAL_OMNIGLOT.parent, cache_dir=cache)  # the parent works too
    assert time.perf_counter() - start < 5
    assert torch.equal(again.images, data.images) and again.characters == data.characters


# ---------------------------------------------------------------------------------------------
# Class splits
# ---------------------------------------------------------------------------------------------


def test_omniglot_splits_sizes_disjoint_and_seeded():
    random.seed(0)
    torch.manual_seed(0)
    splits = omniglot_splits(split_seed=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1100, "validation": 100, "test": 423}
    assert torch.equal(torch.cat(list(splits.values())).sort().values, torch.arange(1623))
    random.seed(99)
    torch.manual_seed(99)
    torch.rand(10)
    same = omniglot_splits(split_seed=1)
    assert all(torch.equal(splits[k], same[k]) for k in splits)
    other = omniglot_splits(split_seed=2)
    assert not torch.equal(splits["test"], other["test"])
    with pytest.raises(UserError):
        omniglot_splits(num_characters=100, train=90, val=10)


# ---------------------------------------------------------------------------------------------
# miniImageNet
# ---------------------------------------------------------------------------------------------


def _mini_pickle(path: Path, per_class: int = 4) -> dict:
    """learn2learn's format, 3 classes: image i of class nX is 10 X + i (+ 100 per channel)."""
    wnids = ["n03", "n01", "n02"]  # out of order: the loader orders classes by wnid
    images = np.zeros((3 * per_class, 84, 84, 3), np.uint8)
    class_dict = {}
    for c, wnid in enumerate(wnids):
        indices = list(range(c, 3 * per_class, 3))  # interleaved
        class_dict[wnid] = indices
        for i, index in enumerate(indices):
            images[index] = 10 * int(wnid[-1]) + i + np.array([0, 100, 200], np.uint8)
    data = {"image_data": images, "class_dict": class_dict}
    path.write_bytes(pickle.dumps(data))
    return data


def test_miniimagenet_pickle(tmp_path):
    _mini_pickle(tmp_path / "mini-imagenet-cache-validation.pkl")
    images = load_miniimagenet(tmp_path, "validation")
    assert images.shape == (3, 4, 3, 84, 84) and images.dtype == torch.uint8
    for c in range(3):
        for i in range(4):
            assert images[c, i, :, 5, 7].tolist() == [
                10 * (c + 1) + i + 100 * ch for ch in (0, 1, 2)
            ]


def test_miniimagenet_html_truncated_and_missing_pickles(tmp_path):
    with pytest.raises(UserError, match=r"mini-imagenet-cache-train\.pkl: not found.*download"):
        load_miniimagenet(tmp_path, "train")
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive</title></head></html>")
    with pytest.raises(UserError, match=r"cache-train\.pkl: an HTML page.*delete it and download"):
        load_miniimagenet(tmp_path, "train")
    whole = pickle.dumps(_mini_pickle(tmp_path / "whole.pkl"))
    for cut in (len(whole) // 2, 30, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(UserError, match=r"cache-train\.pkl: .*delete it and download again"):
            load_miniimagenet(tmp_path, "train")
    with pytest.raises(ValueError, match="split='val'"):  # a programming error, not the user's
        load_miniimagenet(tmp_path, "val")


COLORS = {"n02": (200, 30, 30), "n01": (20, 180, 60)}


def _mini_folder(root: Path, csv_dir: Path, per_class: int = 3) -> None:
    """Raw images (various sizes, JPEG and PNG) named as in Ravi & Larochelle's csvs."""
    (root / "images").mkdir(parents=True)
    csv_dir.mkdir(parents=True, exist_ok=True)
    rows = ["filename,label"]
    for wnid, color in COLORS.items():
        for i in range(per_class):
            name = f"{wnid}{i:08d}.{'png' if i == 0 else 'jpg'}"
            Image.new("RGB", (120 + 10 * i, 90), color).save(root / "images" / name)
            rows.append(f"{name},{wnid}")
    (csv_dir / "val.csv").write_text("\n".join(rows) + "\n")


def test_miniimagenet_image_folder(tmp_path, monkeypatch):
    _mini_folder(tmp_path / "data", tmp_path / "data" / "splits")
    images = load_miniimagenet(tmp_path / "data", "validation", cache_dir=tmp_path / "cache")
    assert images.shape == (2, 3, 3, 84, 84) and images.dtype == torch.uint8
    for c, wnid in enumerate(sorted(COLORS)):  # classes ordered by wnid
        mean = images[c].float().mean(dim=(0, 2, 3))
        assert torch.allclose(mean, torch.tensor(COLORS[wnid], dtype=torch.float), atol=4)
    assert len(list((tmp_path / "cache").glob("miniimagenet-validation-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds the tensor")

    with monkeypatch.context() as patch:
        patch.setattr(preprocess.Image, "open", no_decoding)
        again = load_miniimagenet(tmp_path / "data", "validation", cache_dir=tmp_path / "cache")
    assert torch.equal(again, images)


def test_miniimagenet_image_folder_csv_places_and_errors(tmp_path):
    _mini_folder(tmp_path / "data", tmp_path / "csvs")
    with pytest.raises(UserError, match=r"splits/val\.csv: not found"):
        load_miniimagenet(tmp_path / "data", "validation", cache_dir=tmp_path / "cache")
    for csv_file in (tmp_path / "csvs").iterdir():  # beside images/ is the other place looked in
        csv_file.rename(tmp_path / "data" / csv_file.name)
    images = load_miniimagenet(tmp_path / "data", "validation", cache_dir=tmp_path / "c")
    assert images.shape == (2, 3, 3, 84, 84)
    (tmp_path / "data" / "images" / "n0100000001.jpg").unlink()
    with pytest.raises(UserError, match=r"images/n0100000001\.jpg: not found"):
        load_miniimagenet(tmp_path / "data", "validation", cache_dir=tmp_path / "c")
