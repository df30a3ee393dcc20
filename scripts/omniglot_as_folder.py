"""Write Omniglot out as a user's image folder: the measured example of the README's "Use it on
your own images", and what the tests use as real drawings.

    python scripts/omniglot_as_folder.py <dir with the Omniglot zips> <out>

writes <out>/drawings/<alphabet_character>/<drawing>.png (the 964 characters of
images_background.zip, the raw 105x105 PNGs) and a new task of five characters of five alphabets
of images_evaluation.zip: <out>/new_task/support/ (1 drawing each), support5/ (5 each) and
query/ (15 others each).
"""

from __future__ import annotations

import functools
import sys
import zipfile
from pathlib import Path


@functools.cache
def _opened(archive: Path) -> zipfile.ZipFile:
    """The archive, opened once and kept open: reading its index of 32,000 members again for
    each character would take most of the time."""
    return zipfile.ZipFile(archive)


@functools.cache
def omniglot_characters(archive: Path) -> dict[str, list[str]]:
    """ "<set>/<alphabet>/<character>" -> its drawings' zip members, in the order mamlrun loads
    (listed once per archive; callers must not change it)."""
    members = [m for m in _opened(archive).namelist() if m.endswith(".png")]
    characters: dict[str, list[str]] = {}
    for member in sorted(members, key=lambda m: m.split("/")):
        characters.setdefault(member.rsplit("/", 1)[0], []).append(member)
    return characters


def write_drawings(
    root: Path, character: str, destination: Path, drawings: slice = slice(None)
) -> list[Path]:
    """Some drawings of `character` ("<set>/<alphabet>/<character>"), copied out of its archive
    in `root` into `destination` as they are."""
    archive = root / f"{character.split('/')[0]}.zip"
    members = omniglot_characters(archive)[character][drawings]
    destination.mkdir(parents=True, exist_ok=True)
    for member in members:
        (destination / member.rsplit("/", 1)[1]).write_bytes(_opened(archive).read(member))
    return sorted(destination.iterdir())


def folder_name(character: str) -> str:
    return "_".join(character.split("/")[1:])


def main(root: Path, out: Path) -> None:
    for character in omniglot_characters(root / "images_background.zip"):
        write_drawings(root, character, out / "drawings" / folder_name(character))
    for character in list(omniglot_characters(root / "images_evaluation.zip"))[3:600:130]:
        name = folder_name(character)  # five characters of five alphabets
        write_drawings(root, character, out / "new_task" / "support" / name, slice(0, 1))
        write_drawings(root, character, out / "new_task" / "support5" / name, slice(0, 5))
        write_drawings(root, character, out / "new_task" / "query" / name, slice(5, None))
    print(f"wrote {out / 'drawings'} and {out / 'new_task'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    main(Path(sys.argv[1]).expanduser(), Path(sys.argv[2]).expanduser())
