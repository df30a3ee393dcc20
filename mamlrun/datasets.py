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
import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mamlrun.errors import UserError

CACHE_VERSION = 1  # bump when a loader's output changes for the same input files

# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------

OMNIGLOT_SETS = ("images_background", "images_evaluation")
# set -> (alphabets, characters, drawings per character) of the official release
OMNIGLOT_COUNTS = {"images_background": (30, 964, 20), "images_evaluation": (20, 659, 20)}
# md5 of the official zips (the values torchvision checks)
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
OMNIGLOT_SIZE = 28
RESAMPLE = Image.Resampling.LANCZOS  # the paper's filter for Omniglot, also used for miniImageNet


@dataclass
class OmniglotData:
    """All 1623 Omniglot characters, background set first.

    Attributes:
        images: uint8 [characters, drawings, 28, 28], ink = 255, background = 0.
        characters: "set/alphabet/characterNN" name of each row of `images`.
    """

    images: torch.Tensor
    characters: list[str]

    @property
    def num_background(self) -> int:
        """Rows that come from images_background (964 in the real data)."""
        return sum(name.startswith("images_background/") for name in self.characters)


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
        """One drawing, preprocessed: 28x28 LANCZOS, inverted so ink = 255."""
        try:
            if self.is_zip:
                data = self.zip.read(member)
            else:
                data = (self.path.parent / member).read_bytes()
            image = Image.open(io.BytesIO(data)).convert("L")
            image = image.resize((OMNIGLOT_SIZE, OMNIGLOT_SIZE), RESAMPLE)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, zlib.error) as error:
            raise UserError(f"{self.path}: cannot read {member} ({error}); {self.fix}") from None
        return 255 - np.asarray(image, dtype=np.uint8)


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
        "resample": RESAMPLE.name,
        "invert": True,
        "sources": [s.identity() for s in sets],
    }
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return _cached(cache / f"omniglot-{_digest(key)}.pt", build)


def omniglot_splits(
    num_characters: int = 1623, split_seed: int = 1, train: int = 1100, val: int = 100
) -> dict[str, torch.Tensor]:
    """Split character indices into meta-train / validation / test classes.

    The paper meta-trains on 1200 characters and tests on the remaining 423; the authors' code
    keeps 100 of the 1200 for validation. The split is a permutation drawn from its own
    generator, so it depends on `split_seed` only (learn2learn's depends on the global seed).

    Returns:
        {"train": first `train` of the permutation, "validation": next `val`, "test": the rest},
        each sorted ascending.
    """
    if train + val >= num_characters:
        raise UserError(
            f"{train} train + {val} validation characters leave no test characters out of "
            f"{num_characters}; lower the train or validation count"
        )
    order = torch.randperm(num_characters, generator=torch.Generator().manual_seed(split_seed))
    parts = {"train": order[:train], "validation": order[train : train + val]}
    parts["test"] = order[train + val :]
    return {name: part.sort().values for name, part in parts.items()}


# ---------------------------------------------------------------------------------------------
# miniImageNet
# ---------------------------------------------------------------------------------------------

MINI_CSV = {"train": "train", "validation": "val", "test": "test"}  # split -> Ravi's csv name
MINI_SIZE = 84


def load_miniimagenet(
    root: Path | str,
    split: str,
    download: bool = False,
    splits_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
) -> torch.Tensor:
    """Load one miniImageNet split as uint8 [classes, images per class, 3, 84, 84].

    Two layouts are read from `root` or `root/miniimagenet/`:

    A. learn2learn's pickle `mini-imagenet-cache-<split>.pkl` (dict with "image_data", uint8
       [N, 84, 84, 3], and "class_dict", wnid -> image indices). Unpickling can run code: only
       load files from a source you trust.
    B. A folder `images/` of the raw images named as in Ravi & Larochelle's csvs, resized to 84x84
       with LANCZOS (their script's filter) unless already that size, converted to RGB, and
       cached. The csv (`train.csv`, `val.csv` or `test.csv`) is looked up in `splits_dir`,
       `root/splits/`, then `root/`.

    Classes are ordered by WordNet id; 64 / 16 / 20 classes of 600 images in the real data.

    Args:
        root: directory holding the data.
        split: "train", "validation" or "test".
        download: fetch the missing pickle with learn2learn's downloader (format A).
        splits_dir: extra directory with the csvs (format B).
        cache_dir: where format B's tensor is kept; default as for Omniglot.

    Raises:
        UserError: missing, truncated or non-pickle files (e.g. an HTML page saved by a failed
            Google Drive download), or images that do not match the csv.
    """
    if split not in MINI_CSV:
        raise UserError(f"dataset.split={split!r}: expected one of {', '.join(MINI_CSV)}")
    root = Path(root).expanduser()
    bases = [root, root / "miniimagenet"]
    pickle_name = f"mini-imagenet-cache-{split}.pkl"
    for base in bases:
        if (base / pickle_name).is_file():
            return _load_mini_pickle(base / pickle_name)
    for base in bases:
        if (base / "images").is_dir():
            return _load_mini_folder(base, split, splits_dir, cache_dir)
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


def _load_mini_folder(
    base: Path, split: str, splits_dir: Path | str | None, cache_dir: Path | str | None
) -> torch.Tensor:
    """Format B: raw images listed by Ravi & Larochelle's csv, resized and cached."""
    csv_name = f"{MINI_CSV[split]}.csv"
    places = ([Path(splits_dir).expanduser()] if splits_dir is not None else []) + [
        base / "splits",
        base,
    ]
    csv_path = next((p / csv_name for p in places if (p / csv_name).is_file()), None)
    if csv_path is None:
        raise UserError(
            f"{base / 'splits' / csv_name}: not found; put Ravi & Larochelle's split csvs in "
            "dataset.root/splits or set dataset.splits_dir"
        )
    with open(csv_path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows or rows[0] != ["filename", "label"] or any(len(row) != 2 for row in rows[1:]):
        raise UserError(f"{csv_path}: expected a 'filename,label' header and two columns")
    by_class: dict[str, list[str]] = {}
    for filename, label in rows[1:]:
        by_class.setdefault(label, []).append(filename)
    by_class = {label: by_class[label] for label in sorted(by_class)}
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
                path = base / "images" / filename
                try:
                    with Image.open(path) as file:
                        image = file.convert("RGB")
                    if image.size != (MINI_SIZE, MINI_SIZE):
                        image = image.resize((MINI_SIZE, MINI_SIZE), RESAMPLE)
                except (OSError, SyntaxError, ValueError) as error:
                    raise UserError(f"{path}: cannot read the image ({error})") from None
                images[c, i] = np.asarray(image).transpose(2, 0, 1)
        return {"images": torch.from_numpy(images)}

    key = {
        "dataset": "miniimagenet",
        "version": CACHE_VERSION,
        "size": MINI_SIZE,
        "resample": RESAMPLE.name,
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
    from mamlrun.engine import import_learn2learn  # torch and learn2learn only when downloading

    MiniImagenet = import_learn2learn().vision.datasets.MiniImagenet
    try:
        directory.mkdir(parents=True, exist_ok=True)
        MiniImagenet(root=str(directory), mode=split, download=True)
    except Exception as error:  # a failed download shows up as any error of the loader
        raise UserError(
            f"{directory / f'mini-imagenet-cache-{split}.pkl'}: download failed ({error!r}); "
            "delete the file if it exists and try again, or fetch it by hand"
        ) from None


# ---------------------------------------------------------------------------------------------
# Files, downloads and the cache
# ---------------------------------------------------------------------------------------------


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, destination: Path, md5: str | None = None) -> None:
    """Download `url` to `destination`, verified, so a failure never leaves a partial file there.

    The bytes go to `<destination>.part` and are renamed only once complete and (when `md5` is
    given) matching; otherwise the partial file is removed and UserError raised.
    """
    partial = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as file:
            shutil.copyfileobj(response, file, 1 << 20)
    except OSError as error:  # includes urllib's URLError and HTTPError
        partial.unlink(missing_ok=True)
        raise UserError(
            f"{url}: download failed ({error}); fetch it by hand to {destination}"
        ) from None
    if md5 is not None and (actual := file_md5(partial)) != md5:
        partial.unlink()
        raise UserError(
            f"{url}: the download has md5 {actual}, not the official {md5}; try again later "
            f"or fetch it by hand to {destination}"
        )
    os.replace(partial, destination)


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _default_cache_dir() -> Path:
    """`$MAMLRUN_CACHE`, else `~/.cache/mamlrun`: a per-user folder, never the data's own folder,
    which is often shared or read-only (and a root process would write there regardless)."""
    return Path(os.environ.get("MAMLRUN_CACHE", "~/.cache/mamlrun")).expanduser()


def _cached(path: Path, build: Callable[[], dict]) -> dict:
    """Load the dict saved at `path`, or build and save it (atomically: tmp file + os.replace).

    A damaged cache file is rebuilt; a cache that cannot be written only warns, since the data
    is in memory anyway.
    """
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # any unreadable cache is simply rebuilt
            pass
    value = build()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"{path}: cannot write the cache ({error}); the next load redoes the work", stacklevel=3
        )
    return value
