"""`ClassImages`: the images of a dataset's classes, class after class in one flat tensor.

The paper's datasets have as many images in every class (20 Omniglot drawings, 600 miniImageNet
photos), so one [classes, images, C, H, W] tensor would do; a user's folder does not, and padding
its classes to the largest would spend memory on nothing. Classes are therefore contiguous runs of
one [images, C, H, W] tensor, addressed by their start and count; the paper's tensors become one
with a reshape, no copy. Both few-shot samplers (`mamlrun.data.fewshot`) take it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mamlrun.errors import UserError


@dataclass(frozen=True)
class ClassImages:
    """Attributes:
    images: uint8 [total images, C, H, W], the images of class 0, then class 1, ...
    starts: int64 [classes], where each class's images begin in `images`.
    counts: int64 [classes], how many images each class has.
    names: each class's name (a folder, an Omniglot character), for messages; may be empty.
    """

    images: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor
    names: tuple[str, ...] = ()

    @classmethod
    def grouped(cls, images: torch.Tensor, names: Sequence[str] = ()) -> ClassImages:
        """From a [classes, images per class, (C,) H, W] tensor (a view: no copy)."""
        if images.dim() == 4:
            images = images.unsqueeze(2)
        if images.dim() != 5 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [classes, images, (C,) H, W], got "
                f"{images.dtype} {list(images.shape)}"
            )
        classes, per_class = images.shape[:2]
        starts = torch.arange(classes, dtype=torch.long) * per_class
        counts = torch.full((classes,), per_class, dtype=torch.long)
        return cls(images.reshape(-1, *images.shape[2:]), starts, counts, tuple(names))

    @classmethod
    def concatenated(cls, per_class: Sequence[torch.Tensor], names: Sequence[str]) -> ClassImages:
        """From one uint8 [images, C, H, W] tensor per class."""
        counts = torch.tensor([len(images) for images in per_class], dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        return cls(torch.cat(list(per_class)), starts, counts, tuple(names))

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def name(self, index: int) -> str:
        return self.names[index] if self.names else f"class {index}"

    def subset(self, classes: Sequence[int]) -> ClassImages:
        """These classes only, in this order, as a new compact tensor (a view where they are all
        the classes, in order)."""
        classes = list(classes)
        if classes == list(range(len(self))):
            return self
        rows = [torch.arange(self.starts[c], self.starts[c] + self.counts[c]) for c in classes]
        names = tuple(self.names[c] for c in classes) if self.names else ()
        counts = self.counts[classes]
        return ClassImages(
            self.images[torch.cat(rows)], torch.cumsum(counts, 0) - counts, counts, names
        )

    def to(self, device: torch.device | str) -> ClassImages:
        return ClassImages(
            self.images.to(device), self.starts.to(device), self.counts.to(device), self.names
        )


def split_classes(
    num_classes: int, split_seed: int, train: int, validation: int
) -> dict[str, torch.Tensor]:
    """Split class indices into meta-train / validation / test classes.

    The split is a permutation drawn from its own generator, so it depends on `split_seed` only
    (learn2learn's depends on the global seed).

    Returns:
        {"train": first `train` of the permutation, "validation": next `validation`, "test": the
        rest}, each sorted ascending.
    """
    if train + validation >= num_classes:
        raise UserError(
            f"{train} train + {validation} validation classes leave no test classes out of "
            f"{num_classes}; lower the train or validation count"
        )
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(split_seed))
    parts = {"train": order[:train], "validation": order[train : train + validation]}
    parts["test"] = order[train + validation :]
    return {name: part.sort().values for name, part in parts.items()}
