"""miniImageNet (Vinyals et al. 2016, Ravi & Larochelle's split) as one uint8 tensor per split.

Two layouts are read: learn2learn's pickles, or a folder of raw images with the split csvs; the
folder's images are resized to 84x84 once and cached (`mamlrun.data.files`).
"""

from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from mamlrun.data.facts import IMAGE_SIZES
from mamlrun.data.files import CACHE_VERSION, _cached, _default_cache_dir, _digest
from mamlrun.data.preprocess import Preprocessing
from mamlrun.errors import UserError

MINI_CSV = {"train": "train", "validation": "val", "test": "test"}  # split -> Ravi's csv name
MINI_SIZE = IMAGE_SIZES["miniimagenet"]
# 84x84 RGB (LANCZOS, Ravi & Larochelle's script's filter), pixels as they are.
MINI_PREPROCESSING = Preprocessing(size=MINI_SIZE, channels=3)


def load_miniimagenet(
    root: Path | str,
    split: str,
    download: bool = False,
    cache_dir: Path | str | None = None,
) -> torch.Tensor:
    """Load one miniImageNet split as uint8 [classes, images per class, 3, 84, 84].

    Two layouts are read from `root` or `root/miniimagenet/`:

    A. learn2learn's pickle `mini-imagenet-cache-<split>.pkl` (dict with "image_data", uint8
       [N, 84, 84, 3], and "class_dict", wnid -> image indices). Unpickling can run code: only
       load files from a source you trust.
    B. A folder `images/` of the raw images named as in Ravi & Larochelle's csvs, resized to 84x84
       with LANCZOS (their script's filter) unless already that size, converted to RGB, and
       cached. The csv (`train.csv`, `val.csv` or `test.csv`) is looked up in `splits/` next to
       `images/`, then beside it.

    Classes are ordered by WordNet id; 64 / 16 / 20 classes of 600 images in the real data.

    Args:
        root: directory holding the data.
        split: "train", "validation" or "test".
        download: fetch the missing pickle with learn2learn's downloader (format A).
        cache_dir: where format B's tensor is kept; default as for Omniglot.

    Raises:
        UserError: missing, truncated or non-pickle files (e.g. an HTML page saved by a failed
            Google Drive download), or images that do not match the csv.
    """
    if split not in MINI_CSV:
        raise ValueError(f"split={split!r}: expected one of {', '.join(MINI_CSV)}")
    root = Path(root).expanduser()
    bases = [root, root / "miniimagenet"]
    pickle_name = f"mini-imagenet-cache-{split}.pkl"
    for base in bases:
        if (base / pickle_name).is_file():
            return _load_mini_pickle(base / pickle_name)
    for base in bases:
        if (base / "images").is_dir():
            return _load_mini_folder(base, split, cache_dir)
    target = root / "miniimagenet" if (root / "miniimagenet").is_dir() else root
    if not download:
        raise UserError(
            f"{target / pickle_name}: not found (nor an images/ folder); put learn2learn's "
            "miniImageNet pickles in dataset.root or set dataset.download=true"
        )
    download_miniimagenet(target, split)
    return _load_mini_pickle(target / pickle_name)


def _load_mini_pickle(path: Path) -> torch.Tensor:
    """Format A: learn2learn's pickle, regrouped by class (ordered by wnid)."""
    fix = "delete it and download again (dataset.download=true)"
    try:
        with open(path, "rb") as file:
            data = pickle.load(file)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        # a failed Google Drive download saves an HTML page: "invalid load key, '<'"
        html = "'<'" in str(error)
        what = "an HTML page, not a pickle" if html else f"truncated or damaged ({error!r})"
        raise UserError(f"{path}: {what}; {fix}") from None
    images = data.get("image_data") if isinstance(data, dict) else None
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (MINI_SIZE, MINI_SIZE, 3)
        or not isinstance(data.get("class_dict"), dict)
    ):
        raise UserError(
            f'{path}: not learn2learn\'s miniImageNet format ("image_data" uint8 [N, 84, 84, 3] '
            f'and "class_dict"); {fix}'
        )
    by_class = {wnid: list(data["class_dict"][wnid]) for wnid in sorted(data["class_dict"])}
    per_class = _same_count(by_class, path)
    if any(not 0 <= i < len(images) for indices in by_class.values() for i in indices):
        raise UserError(f"{path}: class_dict points outside image_data; {fix}")
    # class by class, so that memory peaks at the pickle plus the result, not three copies
    grouped = torch.empty(len(by_class), per_class, 3, MINI_SIZE, MINI_SIZE, dtype=torch.uint8)
    for c, indices in enumerate(by_class.values()):
        grouped[c] = torch.from_numpy(images[indices]).permute(0, 3, 1, 2)
    return grouped


def _same_count(by_class: dict[str, list], source: Path) -> int:
    """Images per class, which must be equal for the [classes, images, ...] tensor."""
    counts = {len(v) for v in by_class.values()}
    if len(counts) != 1:
        raise UserError(
            f"{source}: classes have different numbers of images ({sorted(counts)}); "
            "every class needs the same number"
        )
    return counts.pop()


def _split_csv(base: Path, split: str) -> tuple[Path, dict[str, list[str]]]:
    """Ravi & Larochelle's csv of the split (in `splits/` or beside `images/`): its path and the
    image file names per class, classes ordered by WordNet id."""
    csv_name = f"{MINI_CSV[split]}.csv"
    places = [base / "splits", base]
    csv_path = next((p / csv_name for p in places if (p / csv_name).is_file()), None)
    if csv_path is None:
        raise UserError(
            f"{base / 'splits' / csv_name}: not found; put Ravi & Larochelle's split csvs in "
            "dataset.root/splits (or beside the images/ folder)"
        )
    with open(csv_path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows or rows[0] != ["filename", "label"] or any(len(row) != 2 for row in rows[1:]):
        raise UserError(f"{csv_path}: expected a 'filename,label' header and two columns")
    by_class: dict[str, list[str]] = {}
    for filename, label in rows[1:]:
        by_class.setdefault(label, []).append(filename)
    return csv_path, {label: by_class[label] for label in sorted(by_class)}


def _load_mini_folder(base: Path, split: str, cache_dir: Path | str | None) -> torch.Tensor:
    """Format B: raw images listed by Ravi & Larochelle's csv, resized and cached."""
    csv_path, by_class = _split_csv(base, split)
    per_class = _same_count(by_class, csv_path)

    listing = hashlib.sha1(csv_path.read_bytes())
    for filenames in by_class.values():
        for filename in filenames:
            try:
                stat = (base / "images" / filename).stat()
            except OSError:
                raise UserError(
                    f"{base / 'images' / filename}: not found; the images/ folder does not "
                    f"hold every image that {csv_path} lists"
                ) from None
            listing.update(f"{filename} {stat.st_size} {stat.st_mtime_ns}\n".encode())

    def build() -> dict:
        images = np.empty((len(by_class), per_class, 3, MINI_SIZE, MINI_SIZE), np.uint8)
        for c, filenames in enumerate(by_class.values()):
            for i, filename in enumerate(filenames):
                images[c, i] = MINI_PREPROCESSING.read(base / "images" / filename)
        return {"images": torch.from_numpy(images)}

    key = {
        "dataset": "miniimagenet",
        "version": CACHE_VERSION,
        "size": MINI_SIZE,
        "resample": MINI_PREPROCESSING.resample,
        "split": split,
        "source": listing.hexdigest(),
    }
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return _cached(cache / f"miniimagenet-{split}-{_digest(key)}.pt", build)["images"]


def download_miniimagenet(directory: Path, split: str) -> None:
    """Fetch learn2learn's `mini-imagenet-cache-<split>.pkl` into `directory`.

    learn2learn 0.2.0 keeps its mirror URLs (Dropbox, Google Drive) inside
    `MiniImagenet.__init__`, so constructing that dataset with download=True is its only public
    way to download. It also loads the file and converts it to float32 (about 3.3 GB for the
    train split) before we drop it and read the pickle ourselves.
    """
    from mamlrun.maml.l2l_engine import import_learn2learn

    MiniImagenet = import_learn2learn().vision.datasets.MiniImagenet
    try:
        directory.mkdir(parents=True, exist_ok=True)
        MiniImagenet(root=str(directory), mode=split, download=True)
    except Exception as error:  # a failed download shows up as any error of the loader
        raise UserError(
            f"{directory / f'mini-imagenet-cache-{split}.pkl'}: download failed ({error!r}); "
            "delete the file if it exists and try again, or fetch it by hand"
        ) from None
