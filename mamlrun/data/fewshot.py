"""N-way K-shot classification tasks from an in-memory image tensor, sampled with learn2learn.

A task picks `ways` classes of a split and `shots + query_shots` images of each; per class, the
first `shots` (after learn2learn's random draw) form the support set and the rest the query set,
so both sets hold disjoint images of the same classes, labelled 0..ways-1 per task. With
`rotations` (Omniglot), each class of a task is rotated by its own multiple of 90 degrees, which
the paper uses to augment the classes (learn2learn 0.2.0's `RandomClassRotation` instead gives
every class of a task the same angle).

learn2learn's transforms draw from Python's global `random` module. The sampler keeps its own
`random.Random` and swaps its state into the module only while it draws, so tasks depend on the
sampler's seed alone, the run's global seeding is left untouched, and `state_dict()` resumes the
exact sequence.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from mamlrun.data.class_images import ClassImages
from mamlrun.data.rng import restore_generator
from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.l2l_engine import import_learn2learn


@contextlib.contextmanager
def _global_random(rng: random.Random) -> Iterator[None]:
    """Make the `random` module draw from `rng`'s state, then hand the state back to `rng`."""
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


class _SplitImages(Dataset):
    """The split's images, flat-indexed (class after class) so learn2learn can address each one.

    Item `i` is (image, class, class) with `class` the position in the split: RemapLabels rewrites
    the second entry to the task label, the third survives so a batch can report its classes.
    """

    def __init__(self, images: ClassImages) -> None:
        self.images = images.images
        self.labels = torch.repeat_interleave(torch.arange(len(images)), images.counts).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = self.labels[index]
        return self.images[index], label, label


def _with_turns(data: list, quarter_turns: int) -> list:
    return [*data, quarter_turns]


def _split_of(
    images: ClassImages | torch.Tensor,
    classes: torch.Tensor | Sequence[int],
    ways: int,
    shots: int,
    query_shots: int,
    split: str | None,
) -> ClassImages:
    """This split's classes, checked to serve tasks of this shape.

    Raises:
        UserError: ways > classes in the split, or shots + query_shots > a class's images (the
            class named).
        ValueError: malformed images or class indices (a programming error, not the user's).
    """
    if isinstance(images, torch.Tensor):
        images = ClassImages.grouped(images)
    classes = torch.as_tensor(classes, dtype=torch.long).tolist()
    if any(not 0 <= c < len(images) for c in classes):
        raise ValueError(f"class indices must lie in [0, {len(images)})")
    the_split = f"the {split} split" if split else "the split"
    for key, value in (("ways", ways), ("shots", shots), ("query_shots", query_shots)):
        if value < 1:
            raise UserError(f"dataset.{key}={value}: must be at least 1")
    if ways > len(classes):
        raise UserError(f"dataset.ways={ways} but {the_split} has {len(classes)} classes")
    smallest = min(classes, key=lambda c: int(images.counts[c]))
    if shots + query_shots > images.counts[smallest]:
        raise UserError(
            f"dataset.shots + dataset.query_shots = {shots + query_shots} > "
            f"{int(images.counts[smallest])} images of {images.name(smallest)} in {the_split}"
        )
    return images.subset(classes)


class ClassRotations:
    """learn2learn task transform: give each class of a task its own multiple of 90 degrees.

    Angles are drawn when the task description is built (not when its data is loaded). Each
    loaded item gains its number of quarter
    turns as a last entry; `ClassificationTasks.sample` then rotates whole batches at once,
    which is much faster than one `rot90` per image.
    """

    def __init__(self, dataset) -> None:  # a learn2learn MetaDataset
        self.dataset = dataset

    def __call__(self, description: list) -> list:
        labels = [self.dataset.indices_to_labels[dd.index] for dd in description]
        turns = {label: random.randrange(4) for label in dict.fromkeys(labels)}
        for dd, label in zip(description, labels, strict=True):
            dd.transforms.append(functools.partial(_with_turns, quarter_turns=turns[label]))
        return description


class ClassificationTasks:
    """Sample N-way K-shot tasks from the classes of one split.

    Args:
        images: the dataset's `ClassImages`, or uint8 [all classes, images per class, (C,) H, W].
        classes: indices (into dim 0 of `images`) of this split's classes.
        ways: classes per task (N).
        shots: support images per class (K).
        query_shots: query images per class.
        rotations: rotate each class of a task by a random multiple of 90 degrees (Omniglot).
        seed: seeds this sampler's own random state.
        split: split name for error messages ("train", "test", ...).

    Example:
        >>> tasks = ClassificationTasks(data.images, splits["train"], ways=5, shots=1,
        ...                             query_shots=1, rotations=True, seed=0)
        >>> batch = tasks.sample(32)  # batch.support_x: float32 [32, 5, 1, 28, 28]

    Raises:
        UserError: the split has fewer than `ways` classes, or a class fewer than
            `shots + query_shots` images.
    """

    task_type = "classification"

    def __init__(
        self,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        ways: int,
        shots: int,
        query_shots: int,
        rotations: bool = False,
        seed: int = 0,
        split: str | None = None,
    ) -> None:
        split_images = _split_of(images, classes, ways, shots, query_shots, split)
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.rotations, self.seed = rotations, seed
        self.input_shape = split_images.image_shape
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        l2l = import_learn2learn()
        dataset = l2l.data.MetaDataset(
            _SplitImages(split_images),
            labels_to_indices={
                label: list(range(start, start + count))
                for label, (start, count) in enumerate(
                    zip(split_images.starts.tolist(), split_images.counts.tolist(), strict=True)
                )
            },
        )
        transforms = [
            l2l.data.transforms.NWays(dataset, n=ways),
            l2l.data.transforms.KShots(dataset, k=shots + query_shots),
            l2l.data.transforms.LoadData(dataset),
            l2l.data.transforms.RemapLabels(dataset),
        ]
        if rotations:
            transforms.append(ClassRotations(dataset))
        self.taskset = l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)
        self._rng = random.Random(seed)

    def sample(self, num_tasks: int) -> TaskBatch:
        """Draw `num_tasks` tasks.

        Returns:
            TaskBatch with support_x float32 [num_tasks, ways * shots, C, H, W] in [0, 1],
            support_y int64 [num_tasks, ways * shots], query_x / query_y likewise with
            `query_shots`; examples are grouped by label (label 0 first). Also attributes
            `classes` [num_tasks, ways] (the class index behind each label) and, with rotations,
            `quarter_turns` [num_tasks, ways] (each label's rotation, in multiples of 90 degrees).
        """
        with _global_random(self._rng):
            tasks = [
                self.taskset.get_task(self.taskset.sample_task_description())
                for _ in range(num_tasks)
            ]
        columns = [torch.stack(column) for column in zip(*tasks, strict=True)]
        # order each task's examples by label, keeping learn2learn's random order within a class
        order = torch.argsort(columns[1], dim=1, stable=True)
        rows = torch.arange(num_tasks)[:, None]
        k = self.shots + self.query_shots
        x, y, local_class, *turns = (
            c[rows, order].view(num_tasks, self.ways, k, *c.shape[2:]) for c in columns
        )
        if turns:
            for quarter_turns in range(1, 4):
                rotate = turns[0] == quarter_turns
                x[rotate] = torch.rot90(x[rotate], quarter_turns, dims=(-2, -1))
        x = x.float().div_(255)

        def part(t: torch.Tensor, s: slice) -> torch.Tensor:
            return t[:, :, s].reshape(num_tasks, -1, *t.shape[3:])

        support, query = slice(0, self.shots), slice(self.shots, k)
        batch = TaskBatch(part(x, support), part(y, support), part(x, query), part(y, query))
        batch.classes = self.classes[local_class[:, :, 0]]
        if turns:
            batch.quarter_turns = turns[0][:, :, 0]
        return batch

    def state_dict(self) -> dict:
        return {"random": self._rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["random"]  # a tuple again if it went through lists
        self._rng.setstate((version, tuple(internal), gauss))


class TensorClassificationTasks:
    """N-way K-shot tasks drawn with tensor indexing on the training device, a whole meta-batch at
    a time: no per-image Python work, no host-to-device copies when the images live on the GPU.

    Draws the same distribution as `ClassificationTasks` (learn2learn's `Taskset` pipeline): for
    each task, `ways` distinct classes uniformly from the split, `shots + query_shots` distinct
    images uniformly per class, the first `shots` as support and the rest as query, labels 0..ways-1
    in a uniformly random class order, and with `rotations` an independent multiple of 90 degrees
    per class. It owns a `torch.Generator` on the device, so tasks depend on `seed` alone.

    Classes may hold different numbers of images: a class's images are drawn as the first `k`
    of its images ordered by uniform random keys, the keys of positions beyond its count set
    above every real key, so they are never among the first `k`.

    Args:
        images: the dataset's `ClassImages` (or uint8 [classes, per class, (C,) H, W]); this
            split's classes are moved to `device` once.
        classes: indices of this split's classes.
        ways, shots, query_shots, rotations, seed, split: as `ClassificationTasks`.
        device: where images are kept and tasks are built.
    """

    task_type = "classification"

    def __init__(
        self,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        ways: int,
        shots: int,
        query_shots: int,
        rotations: bool = False,
        seed: int = 0,
        split: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        split_images = _split_of(images, classes, ways, shots, query_shots, split)
        self.device = torch.device(device)
        self.classes = torch.as_tensor(classes, dtype=torch.long, device=self.device)
        self.images = split_images.to(self.device)  # this split's classes only
        self.largest = int(split_images.counts.max())
        self.uniform = bool((split_images.counts == self.largest).all())
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.rotations, self.seed = rotations, seed
        self.input_shape = split_images.image_shape
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, num_tasks: int) -> TaskBatch:
        """Draw `num_tasks` tasks; same layout and attributes as `ClassificationTasks.sample`."""
        n, ways, k = num_tasks, self.ways, self.shots + self.query_shots
        images, g, device = self.images, self.generator, self.device
        # A uniformly random ordered subset: the first `ways` of a random permutation per task.
        local = torch.rand(n, len(images), generator=g, device=device).argsort(dim=1)[:, :ways]
        keys = torch.rand(n, ways, self.largest, generator=g, device=device)
        if not self.uniform:  # positions past a class's count sort last: never picked
            positions = torch.arange(self.largest, device=device)
            keys = keys.masked_fill(positions >= images.counts[local][..., None], 2.0)
        picks = keys.argsort(dim=2)[..., :k]
        x = images.images[images.starts[local][..., None] + picks]  # [n, ways, k, C, H, W]
        batch_extra = {}
        if self.rotations:
            turns = torch.randint(0, 4, (n, ways), generator=g, device=device)
            # Every image turned 1, 2, 3 times, kept where its class drew that many: selecting
            # with a mask instead would make the host wait for the GPU (nonzero) three times.
            turns_per_image = turns.view(n, ways, *[1] * (x.dim() - 2))
            turned = x
            for quarter_turns in range(1, 4):
                rotated = torch.rot90(x, quarter_turns, dims=(-2, -1))
                turned = torch.where(turns_per_image == quarter_turns, rotated, turned)
            x = turned
            batch_extra["quarter_turns"] = turns
        x = x.float().div_(255)
        y = torch.arange(ways, device=device).view(1, ways, 1).expand(n, ways, k)

        def part(t: torch.Tensor, s: slice) -> torch.Tensor:
            return t[:, :, s].reshape(n, -1, *t.shape[3:])

        support, query = slice(0, self.shots), slice(self.shots, k)
        batch = TaskBatch(part(x, support), part(y, support), part(x, query), part(y, query))
        batch.classes = self.classes[local]
        for name, value in batch_extra.items():
            setattr(batch, name, value)
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        restore_generator(self.generator, state["generator"])
