"""The meta-iteration of learn2learn's `examples/vision/maml_omniglot.py`, for `mamlrun bench`.

What a user would run instead of mamlrun is that script, so this contender rebuilds what it runs
rather than mamlrun's model in a learn2learn loop:

- data: learn2learn's Omniglot benchmark pipeline as `get_tasksets('omniglot', train_ways=5,
  train_samples=2 * shots, num_tasks=20000)` builds it: both torchvision Omniglot sets
  concatenated (learn2learn's `FullOmniglot`), every image read from its PNG and transformed as
  the benchmark does (LANCZOS resize to 28, `ToTensor`, `1 - x`), a `MetaDataset`, the training
  classes of a seeded `random.shuffle` of all 1623, and the Taskset transforms `FusedNWaysKShots`,
  `LoadData`, `RemapLabels`, `ConsecutiveLabels`, `RandomClassRotation`;
- model: learn2learn's `OmniglotCNN` (native `nn.BatchNorm2d`), the swap for `OmniglotFC` that
  the example's README gives for the CNN results;
- per task: `clone()`, the script's `fast_adapt` (support and query split by position: every
  other example), second order, its `.item()` of loss and accuracy; then gradients divided by
  the meta-batch size and `Adam.step()`; 5-way 1-shot, meta-batch 32, one adaptation step, the
  script's learning rates and seed.

The script also adapts one validation task per training task (no backward) in every
iteration; that half is left out, as mamlrun validates only every `train.val_every`
iterations, so this row is the script's training half alone.

torchvision's Omniglot wants its zips with the official md5 next to the extracted folders, else
it downloads them; the archives are extracted once into a cache folder (`$MAMLRUN_CACHE`, else
`~/.cache/mamlrun`; never next to the data) and read there with that check replaced by the
folders' presence (mamlrun's loader has already checked their content). No network is used.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mamlrun.data.files import _default_cache_dir
from mamlrun.data.omniglot import _find_omniglot
from mamlrun.maml.l2l_engine import import_learn2learn

SCRIPT_LABEL = "learn2learn maml_omniglot.py"
SETS = ("images_background", "images_evaluation")
# The script's `main()` defaults.
WAYS, SHOTS, META_BATCH, ADAPTATION_STEPS, FAST_LR, META_LR, SEED = 5, 1, 32, 1, 0.5, 0.003, 42
NUM_TASKS = 20000
TRAIN_CLASSES = 1100  # of 1623, as learn2learn's Omniglot benchmark splits them


def _complete(target: Path) -> bool:
    return all((target / "omniglot-py" / name).is_dir() for name in SETS)


def script_data_root(omniglot_root: Path) -> Path | None:
    """A folder holding torchvision's `omniglot-py/images_{background,evaluation}/` for
    `omniglot_root`'s archives (extracted on first use), or None where it does not hold both."""
    _, sets = _find_omniglot(omniglot_root)
    if set(sets) != set(SETS):
        return None
    key = "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sets.values()
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    target = _default_cache_dir() / "bench" / "learn2learn-omniglot" / digest
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        folder = partial / "omniglot-py"
        folder.mkdir()
        for name, path in sets.items():
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(folder)
            else:  # an extracted folder: linked, not copied
                (folder / name).symlink_to(path.resolve(), target_is_directory=True)
        if _complete(target):  # another process got there first
            shutil.rmtree(partial)
        else:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy left by hand
            os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _full_omniglot(root: Path):
    """learn2learn's `FullOmniglot` over `root`, without torchvision's md5 check of the zips."""
    from torchvision import transforms
    from torchvision.datasets import Omniglot

    class ExtractedOmniglot(Omniglot):
        def _check_integrity(self) -> bool:
            return os.path.isdir(os.path.join(self.root, self._get_target_folder()))

    class FullOmniglot(torch.utils.data.Dataset):
        def __init__(self) -> None:
            background = ExtractedOmniglot(str(root), background=True)
            evaluation = ExtractedOmniglot(
                str(root),
                background=False,
                target_transform=lambda c: c + len(background._characters),
            )
            self.dataset = torch.utils.data.ConcatDataset((background, evaluation))
            self.transform = transforms.Compose(
                [
                    transforms.Resize(28, interpolation=transforms.InterpolationMode.LANCZOS),
                    transforms.ToTensor(),
                    lambda x: 1.0 - x,
                ]
            )
            # learn2learn's MetaDataset reads (or writes once) its label index here
            self._bookkeeping_path = str(root / "omniglot-bookkeeping.pkl")

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, item):
            image, label = self.dataset[item]
            return self.transform(image), label

    return FullOmniglot()


def _train_taskset(l2l, root: Path, ways: int, samples: int):
    """The benchmark's training Taskset (its class split drawn from Python's seeded `random`)."""
    dataset = l2l.data.MetaDataset(_full_omniglot(root))
    classes = list(range(1623))
    random.shuffle(classes)
    train = l2l.data.FilteredMetaDataset(dataset, labels=classes[:TRAIN_CLASSES])
    transforms = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=samples),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
    ]
    return l2l.data.Taskset(train, task_transforms=transforms, num_tasks=NUM_TASKS)


def _fast_adapt(batch, learner, loss, steps: int, shots: int, ways: int, device):
    """Adapt on the even positions of the task's examples, score on the odd ones."""
    data, labels = (t.to(device) for t in batch)
    support = np.zeros(len(data), dtype=bool)
    support[np.arange(shots * ways) * 2] = True
    support = torch.from_numpy(support)
    for _ in range(steps):
        learner.adapt(loss(learner(data[support]), labels[support]))
    predictions = learner(data[~support])
    error = loss(predictions, labels[~support])
    correct = predictions.argmax(dim=1).view(labels[~support].shape) == labels[~support]
    return error, correct.sum().float() / correct.numel()


def script_step(data_root: Path, device: torch.device) -> Callable[[], None]:
    """One training meta-iteration of the script (see the module's docstring)."""
    l2l = import_learn2learn()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    tasks = _train_taskset(l2l, data_root, WAYS, 2 * SHOTS)
    model = l2l.vision.models.OmniglotCNN(WAYS).to(device)
    maml = l2l.algorithms.MAML(model, lr=FAST_LR, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), META_LR)
    loss = nn.CrossEntropyLoss(reduction="mean")

    def step() -> None:
        optimizer.zero_grad()
        for _ in range(META_BATCH):
            learner = maml.clone()
            error, accuracy = _fast_adapt(
                tasks.sample(), learner, loss, ADAPTATION_STEPS, SHOTS, WAYS, device
            )
            error.backward()
            error.item(), accuracy.item()  # the script's running means read them every task
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / META_BATCH)
        optimizer.step()

    return step
