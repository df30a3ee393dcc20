"""Writing a file so that nothing is lost: the old file stays whole until the new one is on disk.

The bytes go to a temporary file in the same directory (so the rename never crosses file
systems), which is flushed and fsynced, renamed over the target, and then the directory itself is
fsynced so the rename survives a power cut. On any failure (a full disk, a file-size limit) the
temporary file is removed, the target is left as it was, and the error is raised again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` with what `write(file)` writes, all or nothing.

    Raises:
        OSError: the write failed, with `path` as its filename (a failed flush names none).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a size limit: name the file, whatever call failed
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)
