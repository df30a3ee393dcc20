"""Files behind the image datasets: verified downloads, checksums and the preprocessed tensor cache.

Decoding 32,460 Omniglot PNGs (or 60,000 JPEGs) takes a while, so a loader's result is saved once
with `torch.save` under a name that changes whenever the source files or the preprocessing change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mamlrun.data.atomic import write_atomically
from mamlrun.errors import UserError

CACHE_VERSION = 1  # bump when a loader's output changes for the same input files


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
    """Load the dict saved at `path`, or build and save it (`write_atomically`: a temporary file
    in the same folder, fsynced, renamed, the folder fsynced).

    A damaged cache file is rebuilt, with a one-line notice; a cache that cannot be written only
    warns, since the data is in memory anyway.
    """
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
            reason = str(error).strip().split("\n")[0].split(". ")[0][:200]
            warnings.warn(
                f"{path}: the cached images are damaged ({type(error).__name__}: {reason}); "
                "rebuilding them from the dataset's files",
                stacklevel=3,
            )
    value = build()
    try:
        write_atomically(path, lambda file: torch.save(value, file))
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        warnings.warn(
            f"{path}: cannot write the cache ({error}); the next load redoes the work", stacklevel=3
        )
    return value
