"""How an image file becomes a model input: one `Preprocessing` for training data and for the
images a user hands `mamlrun adapt`, so a trained model always sees pixels prepared the same way.

It is plain data (size, channels, ink inversion, filter), saved in every checkpoint of an image
dataset, so `adapt` prepares a user's raw files (105x105 Omniglot PNGs, camera JPEGs) exactly as
the run's training images were, whatever the dataset was.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mamlrun.errors import UserError

RESAMPLE = Image.Resampling.LANCZOS  # the paper's filter for Omniglot, also used for miniImageNet
# What PIL raises for a file it cannot decode (a truncated PNG, a text file named .jpg).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, zipfile.BadZipFile, zlib.error)
_WHITE = {"L": 255, "RGB": (255, 255, 255)}


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `size` x `size`, convert to `channels` (1: grayscale, 3: RGB), invert if asked.

    Attributes:
        size: side of the square the image is resized to (aspect ratio not kept, as Ravi &
            Larochelle's miniImageNet script and Omniglot's square drawings); an image already of
            that size is not resampled.
        channels: 1 or 3.
        invert: 255 - pixel, so that Omniglot's black ink on white paper becomes high values.
        resample: PIL filter name.
    """

    size: int
    channels: int
    invert: bool = False
    resample: str = RESAMPLE.name

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**{key: data[key] for key in ("size", "channels", "invert", "resample")})

    def apply(self, image: Image.Image) -> np.ndarray:
        """uint8 [channels, size, size]. Transparent pixels count as white paper."""
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(paper, rgba)
        image = image.convert(self.mode)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling[self.resample])
        pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return 255 - pixels if self.invert else pixels.copy()  # writable, C-contiguous

    def read(self, path: Path, data: bytes | None = None) -> np.ndarray:
        """`apply` to the image file at `path` (or to its bytes `data`, read from an archive).

        Raises:
            UserError: the file cannot be decoded, naming it.
        """
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                image.load()
                return self.apply(image)
        except DECODE_ERRORS as error:
            raise UserError(f"{path}: cannot read the image ({error})") from None


def color_channels(image: Image.Image) -> int:
    """How many channels the image really holds: 1 for grayscale (also stored as RGB with equal
    channels, or a gray palette), 3 for color. What `adapt` compares with the model's input."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return 1
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return 1 if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else 3
