"""A user's own image folder as a few-shot dataset (`dataset=folder`), in the ImageFolder
convention: `root/<class>/<images>` (the classes split into train / validation / test by
`split_seed`), or `root/{train,val,test}/<class>/<images>` (the split used as given).

Listing the folder is cheap and reads no image, so `scan_folder` runs before any work and refuses,
in one line, a split with fewer classes than a task's ways or a class with fewer images than a
task takes. `load_folder` then decodes every image with the run's `Preprocessing` (any size or
mode PIL reads) and caches the result like the paper's datasets: under `$MAMLRUN_CACHE`, never
next to the data, keyed by every file's path, size and modification time and the preprocessing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mamlrun.data.class_images import ClassImages, split_classes
from mamlrun.data.files import CACHE_VERSION, _cached, _default_cache_dir, _digest
from mamlrun.data.preprocess import Preprocessing
from mamlrun.errors import UserError

SPLITS = ("train", "validation", "test")
# Folder names accepted for each split in the root/{train,val,test}/ layout.
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


def image_suffixes() -> frozenset[str]:
    """File name endings PIL can open (.png, .jpg, .jpeg, .bmp, .tif, .webp, ...)."""
    Image.init()
    return frozenset(Image.registered_extensions())


def class_images(folder: Path) -> list[Path]:
    """The image files of one class folder, its subfolders included, sorted by path; hidden
    files and files PIL does not read (a README, .DS_Store) are skipped."""
    suffixes = image_suffixes()
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in suffixes
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def class_folders(folder: Path) -> list[Path]:
    """The subfolders of `folder`, sorted by name, hidden ones skipped."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class FolderListing:
    """Per split, each class's name and image files (no image read yet)."""

    root: Path
    layout: str  # "classes" (split by split_seed) or "splits" (root/{train,val,test}/)
    splits: dict[str, list[tuple[str, list[Path]]]]


def scan_folder(root: Path | str, splits: dict[str, float | int], split_seed: int) -> FolderListing:
    """List the classes and images of each split.

    Args:
        root: the dataset folder.
        splits: train / validation / test as fractions of the classes (summing to 1) or counts;
            unused in the root/{train,val,test}/ layout.
        split_seed: seeds the permutation that assigns classes to splits.

    Raises:
        UserError: no such folder, no class folders, or a split that gets no classes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={root}: not a folder; give a folder of class folders")
    folders = class_folders(root)
    names = {folder.name for folder in folders}
    given = {alias for aliases in SPLIT_FOLDERS.values() for alias in aliases}
    if "train" in names and len(names & given) > 1:  # train/ beside val/, validation/ or test/
        other = sorted(names - given)
        if other:
            raise UserError(
                f"{root / other[0]}: not a split folder; the root/{{train,val,test}}/ layout "
                "holds only train/, val/ (or validation/) and test/"
            )
        return FolderListing(root, "splits", _given_splits(root))
    classes = [(folder.name, class_images(folder)) for folder in folders]
    if not classes:
        raise UserError(
            f"dataset.root={root}: no class folders; expected root/<class>/<images> or "
            "root/{train,val,test}/<class>/<images>"
        )
    counts = split_counts(splits, len(classes), root)
    parts = split_classes(len(classes), split_seed, counts["train"], counts["validation"])
    # counts that sum to fewer than the classes leave the rest out (of the test split's share)
    parts["test"] = parts["test"][: counts["test"]]
    listing = {split: [classes[c] for c in parts[split].tolist()] for split in SPLITS}
    return FolderListing(root, "classes", listing)


def _given_splits(root: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    listing = {}
    for split, aliases in SPLIT_FOLDERS.items():
        found = [root / alias for alias in aliases if (root / alias).is_dir()]
        if not found:
            raise UserError(
                f"{root / aliases[0]}: not found; the root/{{train,val,test}}/ layout needs all "
                "three split folders (or put the class folders directly in dataset.root)"
            )
        listing[split] = [(folder.name, class_images(folder)) for folder in class_folders(found[0])]
    return listing


def split_counts(splits: dict[str, float | int], classes: int, root: Path) -> dict[str, int]:
    """Classes per split from `dataset.splits`: fractions rounded (test takes the remainder) or
    counts (classes beyond their sum are left out)."""
    values = [splits[split] for split in SPLITS]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        counts = dict(zip(SPLITS, values, strict=True))
        if sum(values) > classes:
            raise UserError(
                f"dataset.splits={counts} asks for {sum(values)} classes but {root} has "
                f"{classes}; lower the counts"
            )
    else:
        train = round(splits["train"] * classes)
        validation = round(splits["validation"] * classes)
        counts = {"train": train, "validation": validation, "test": classes - train - validation}
    for split, count in counts.items():
        if count < 1:
            raise UserError(
                f"dataset.splits: the {split} split of {root} gets no classes ({classes} classes "
                f"in all, split {counts}); raise its share or add classes"
            )
    return counts


def check_tasks(
    listing: FolderListing, ways: int, shots: int, train_queries: int, eval_queries: int
) -> None:
    """Refuse, before any work, a split with fewer classes than `ways` or a class with fewer
    images than one task takes (the first such class named, with its count)."""
    for split, classes in listing.splits.items():
        train = split == "train"
        queries = train_queries if train else eval_queries
        key = "query_shots" if train else "test_query_shots"
        where = f"the {split} split of {listing.root}"
        if len(classes) < ways:
            fix = "lower dataset.ways" + (
                ", or give dataset.splits as class counts" if listing.layout == "classes" else ""
            )
            raise UserError(f"dataset.ways={ways} but {where} has {len(classes)} classes; {fix}")
        for name, images in classes:
            if len(images) < shots + queries:
                folder = _class_folder(listing, split, name)
                raise UserError(
                    f"{folder}: {len(images)} images, but a task of {where} takes "
                    f"dataset.shots + dataset.{key} = {shots + queries} per class; add images, "
                    "lower the shots or remove the class"
                )


def _class_folder(listing: FolderListing, split: str, name: str) -> Path:
    if listing.layout == "classes":
        return listing.root / name
    aliases = SPLIT_FOLDERS[split]
    base = next(listing.root / a for a in aliases if (listing.root / a).is_dir())
    return base / name


def load_folder(
    listing: FolderListing, preprocessing: Preprocessing, cache_dir: Path | str | None = None
) -> dict[str, ClassImages]:
    """Every split's images, decoded with `preprocessing` once and cached.

    Raises:
        UserError: an image cannot be decoded (named by its path).
    """
    identity = hashlib.sha1(str(listing.root.resolve()).encode())
    for split in SPLITS:
        for name, images in listing.splits[split]:
            for path in images:
                stat = path.stat()
                where = f"{split} {name} {path.relative_to(listing.root).as_posix()}"
                identity.update(f"{where} {stat.st_size} {stat.st_mtime_ns}\n".encode())

    def build() -> dict:
        result = {}
        for split in SPLITS:
            classes = listing.splits[split]
            per_class = [
                torch.from_numpy(np.stack([preprocessing.read(path) for path in images]))
                for _, images in classes
            ]
            result[split] = {
                "images": torch.cat(per_class),
                "counts": torch.tensor([len(images) for _, images in classes]),
                "names": [name for name, _ in classes],
            }
        return result

    key = {
        "dataset": "folder",
        "version": CACHE_VERSION,
        "preprocessing": preprocessing.to_dict(),
        "source": identity.hexdigest(),
    }
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    data = _cached(cache / f"folder-{_digest(key)}.pt", build)
    result = {}
    for split in SPLITS:
        part = data[split]
        starts = torch.cumsum(part["counts"], 0) - part["counts"]
        result[split] = ClassImages(part["images"], starts, part["counts"], tuple(part["names"]))
    return result


def is_fraction(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0 < value < 1
