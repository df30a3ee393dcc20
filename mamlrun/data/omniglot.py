"""Omniglot and miniImageNet as in-memory uint8 tensors, checked, preprocessed once and cached.

Few-shot samplers index images by (class, image), so every loader returns one tensor
[classes, images per class, (channels,) height, width] and leaves pixel scaling to the caller.
Preprocessing is the paper's (Finn et al. 2017, Appendix A.1): Omniglot resized to 28x28 with
LANCZOS and inverted so ink is high; miniImageNet at 84x84 RGB. Decoding 32,460 Omniglot PNGs (or
60,000 JPEGs) takes a while, so the result is saved once with `torch.save` under a name that
changes whenever the source files or the preprocessing change; later loads read that file.

Every problem the user can fix (a missing or damaged file, an incomplete archive) raises
`UserError` with one line that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mamlrun.data.class_images import split_classes
from mamlrun.data.facts import IMAGE_SIZES, IMAGES_PER_CLASS, SPLIT_CLASSES
from mamlrun.data.files import (
    CACHE_VERSION,
    _cached,
    _default_cache_dir,
    _digest,
    download_file,
    file_md5,
)
from mamlrun.data.preprocess import DECODE_ERRORS, Preprocessing
from mamlrun.errors import UserError

OMNIGLOT_SETS = ("images_background", "images_evaluation")
# set -> (alphabets, characters, drawings per character) of the official release
_DRAWINGS = IMAGES_PER_CLASS["omniglot"]
OMNIGLOT_COUNTS = {
    "images_background": (30, 964, _DRAWINGS),
    "images_evaluation": (20, 659, _DRAWINGS),
}
# md5 of the official zips (the values torchvision checks)
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
OMNIGLOT_SIZE = IMAGE_SIZES["omniglot"]
# The paper's: 28x28 with LANCZOS, inverted so that ink is high (Finn et al. 2017, Appendix A.1).
OMNIGLOT_PREPROCESSING = Preprocessing(size=OMNIGLOT_SIZE, channels=1, invert=True)


@dataclass
class OmniglotData:
    """All 1623 Omniglot characters, background set first.

    Attributes:
        images: uint8 [characters, drawings, 28, 28], ink = 255, background = 0.
        characters: "set/alphabet/characterNN" name of each row of `images`.
    """

    images: torch.Tensor
    characters: list[str]


class _OmniglotSet:
    """One Omniglot set (background or evaluation), read from its zip or its extracted folder.

    Both layouts hold `<set>/<alphabet>/<character>/<drawing>.png`; this class lists them sorted
    by name so that row order never depends on the file system or the zip's entry order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.suffix == ".zip"
        self.name = path.stem if self.is_zip else path.name
        self.fix = "delete it and download again" if self.is_zip else "extract the archive again"
        if self.is_zip:
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise UserError(
                    f"{path}: not a readable zip archive ({error}); {self.fix}"
                ) from None
            members = self.zip.namelist()
        else:
            members = [p.relative_to(path.parent).as_posix() for p in path.glob("*/*/*.png")]
        self.characters: dict[str, list[str]] = {}  # "alphabet/characterNN" -> member paths
        for member in sorted(members, key=lambda m: m.split("/")):
            parts = member.split("/")
            if len(parts) == 4 and parts[0] == self.name and parts[3].endswith(".png"):
                self.characters.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)

    def check(self, alphabets: int, characters: int, drawings: int) -> None:
        """Raise UserError unless the set holds exactly the expected numbers of files."""
        where = f"{self.name} ({self.path})"
        found = len({name.split("/")[0] for name in self.characters})
        if found != alphabets:
            raise UserError(
                f"expected {alphabets} alphabets in {where}, found {found}; "
                f"it is incomplete or not Omniglot: {self.fix}"
            )
        if len(self.characters) != characters:
            raise UserError(
                f"expected {characters} characters in {where}, found {len(self.characters)}; "
                f"it is incomplete or not Omniglot: {self.fix}"
            )
        for name, members in self.characters.items():
            if len(members) != drawings:
                raise UserError(
                    f"expected {drawings} drawings of {name} in {where}, found {len(members)}; "
                    f"it is incomplete or not Omniglot: {self.fix}"
                )

    def identity(self) -> list:
        """What the cache key needs to notice a changed source: sizes and modification times."""
        if self.is_zip:
            stat = self.path.stat()
            return [self.name, stat.st_size, stat.st_mtime_ns]
        listing = hashlib.sha1()
        for members in self.characters.values():
            for member in members:
                stat = (self.path.parent / member).stat()
                listing.update(f"{member} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        return [self.name, listing.hexdigest()]

    def read(self, member: str) -> np.ndarray:
        """One drawing, preprocessed (OMNIGLOT_PREPROCESSING): 28x28, ink = 255."""
        try:
            if self.is_zip:
                data = self.zip.read(member)
            else:
                data = (self.path.parent / member).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                return OMNIGLOT_PREPROCESSING.apply(image)[0]
        except DECODE_ERRORS as error:
            raise UserError(f"{self.path}: cannot read {member} ({error}); {self.fix}") from None


def _omniglot_dirs(root: Path) -> list[Path]:
    """Where Omniglot may lie: root itself, torchvision's omniglot-py/, and both under omniglot/."""
    return [base / sub for base in (root, root / "omniglot") for sub in ("", "omniglot-py")]


def _find_omniglot(root: Path) -> tuple[Path, dict[str, Path]]:
    """The directory to use and, per set, its extracted folder or zip (missing sets left out).

    The first directory holding both sets wins; else the first holding one of them (so an error
    names the file that is missing next to the one found); else root/omniglot or root.
    """
    found = []
    for directory in _omniglot_dirs(root):
        sets = {}
        for name in OMNIGLOT_SETS:
            if (directory / f"{name}.zip").is_file():
                sets[name] = directory / f"{name}.zip"
            elif (directory / name).is_dir():
                sets[name] = directory / name
        if len(sets) == len(OMNIGLOT_SETS):
            return directory, sets
        if sets:
            found.append((directory, sets))
    if found:
        return found[0]
    return (root / "omniglot" if (root / "omniglot").is_dir() else root), {}


def load_omniglot(
    root: Path | str,
    download: bool = False,
    cache_dir: Path | str | None = None,
    expected_counts: dict[str, tuple[int, int, int]] | None = None,
) -> OmniglotData:
    """Load all Omniglot characters as uint8 [1623, 20, 28, 28], ink = 255.

    Reads the two official archives `images_background.zip` and `images_evaluation.zip` directly,
    or their extracted folders, in `root`, `root/omniglot-py/` (torchvision's layout),
    `root/omniglot/` or `root/omniglot/omniglot-py/`. The content is checked (alphabets,
    characters and drawings per set) because that, not the md5, is what the experiments need:
    a zip whose md5 is not the official one only warns.

    Args:
        root: directory holding the data (or a parent of an `omniglot/` directory that does).
        download: fetch missing archives from brendenlake/omniglot on GitHub.
        cache_dir: where the preprocessed tensor is kept; default `$MAMLRUN_CACHE`, else
            `~/.cache/mamlrun`.
        expected_counts: set name -> (alphabets, characters, drawings per character); None means
            the official release (and then zips are also compared with the official md5).
            Tests pass their own to load tiny synthetic archives.

    Returns:
        OmniglotData with characters ordered background set first, then evaluation; alphabets,
        characters and drawings sorted by name.

    Raises:
        UserError: a file is missing or damaged, or a set does not hold the expected counts.
    """
    root = Path(root).expanduser()
    counts = OMNIGLOT_COUNTS if expected_counts is None else expected_counts
    directory, paths = _find_omniglot(root)
    for name in OMNIGLOT_SETS:
        if name in paths:
            continue
        zip_path = directory / f"{name}.zip"
        if not download:
            raise UserError(
                f"{zip_path}: not found; put the official Omniglot archives in dataset.root "
                "or set dataset.download=true"
            )
        download_file(OMNIGLOT_URL.format(name), zip_path, OMNIGLOT_MD5[name])
        paths[name] = zip_path

    with contextlib.ExitStack() as stack:
        sets = []
        for name in OMNIGLOT_SETS:
            sets.append(_OmniglotSet(paths[name]))
            if sets[-1].is_zip:
                stack.callback(sets[-1].zip.close)
        data = _load_omniglot_sets(sets, counts, expected_counts is None, root, cache_dir)
    return OmniglotData(data["images"], data["characters"])


def _load_omniglot_sets(
    sets: list[_OmniglotSet],
    counts: dict[str, tuple[int, int, int]],
    official: bool,
    root: Path,
    cache_dir: Path | str | None,
) -> dict:
    """Check both sets, then read the preprocessed tensor from the cache or build it."""
    for image_set in sets:
        image_set.check(*counts[image_set.name])
        if official and image_set.is_zip:
            md5 = file_md5(image_set.path)
            if md5 != OMNIGLOT_MD5[image_set.name]:
                warnings.warn(
                    f"{image_set.path}: md5 {md5} is not the official "
                    f"{OMNIGLOT_MD5[image_set.name]}; its content checks out, so it is used",
                    stacklevel=3,
                )
    drawings = {counts[image_set.name][2] for image_set in sets}
    if len(drawings) != 1:
        raise ValueError(f"every set needs the same number of drawings per character: {counts}")

    def build() -> dict:
        names = [f"{s.name}/{c}" for s in sets for c in s.characters]
        members = [(s, m) for s in sets for ms in s.characters.values() for m in ms]
        images = np.empty((len(names), *drawings, OMNIGLOT_SIZE, OMNIGLOT_SIZE), np.uint8)
        flat = images.reshape(-1, OMNIGLOT_SIZE, OMNIGLOT_SIZE)
        for i, (image_set, member) in enumerate(members):
            flat[i] = image_set.read(member)
        return {"images": torch.from_numpy(images), "characters": names}

    key = {
        "dataset": "omniglot",
        "version": CACHE_VERSION,
        "size": OMNIGLOT_SIZE,
        "resample": OMNIGLOT_PREPROCESSING.resample,
        "invert": OMNIGLOT_PREPROCESSING.invert,
        "sources": [s.identity() for s in sets],
    }
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return _cached(cache / f"omniglot-{_digest(key)}.pt", build)


def omniglot_splits(
    num_characters: int = sum(SPLIT_CLASSES["omniglot"].values()),
    split_seed: int = 1,
    train: int = SPLIT_CLASSES["omniglot"]["train"],
    val: int = SPLIT_CLASSES["omniglot"]["validation"],
) -> dict[str, torch.Tensor]:
    """Split character indices into meta-train / validation / test classes (`split_classes`).

    The paper meta-trains on 1200 characters and tests on the remaining 423; the authors' code
    keeps 100 of the 1200 for validation. The split depends on `split_seed` only.
    """
    return split_classes(num_characters, split_seed, train, val)
