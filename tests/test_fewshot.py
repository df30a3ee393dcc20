"""N-way K-shot task sampling: shapes, labels, disjoint support/query, determinism, rotations.

The images are synthetic and tell who they are: channel 0 holds the class, channel 1 the image's
number within its class (both constant planes, so unchanged by rotation), and channel 2 a single
marker pixel in the top-left corner, whose position after sampling reveals the rotation.
"""

import copy
import io
import random

import pytest
import torch

from mamlrun.data.class_images import ClassImages
from mamlrun.data.fewshot import ClassificationTasks, TensorClassificationTasks
from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch

CLASSES, PER_CLASS, SIZE = 12, 8, 5
SPLIT = [1, 2, 4, 5, 7, 8, 10, 11]  # classes 0, 3, 6, 9 belong to another split


def _images() -> torch.Tensor:
    images = torch.zeros(CLASSES, PER_CLASS, 3, SIZE, SIZE, dtype=torch.uint8)
    images[:, :, 0] = torch.arange(CLASSES).view(-1, 1, 1, 1)
    images[:, :, 1] = torch.arange(PER_CLASS).view(1, -1, 1, 1)
    images[:, :, 2, 0, 0] = 255
    return images


IMAGES = _images()
MARKERS = torch.stack([torch.rot90(IMAGES[0, 0, 2], k, dims=(0, 1)) for k in range(4)])


def _decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class, image number, quarter turns) of every image in x [..., 3, SIZE, SIZE] float."""
    pixels = (x * 255).round().to(torch.uint8)
    cls, number = pixels[..., 0, 2, 2].long(), pixels[..., 1, 2, 2].long()
    matches = (pixels[..., 2, :, :].unsqueeze(-3) == MARKERS).flatten(-2).all(-1)
    assert (matches.sum(-1) == 1).all(), "every image is an exact rotation of its original"
    return cls, number, matches.float().argmax(-1)


SAMPLERS = [ClassificationTasks, TensorClassificationTasks]


@pytest.fixture(params=SAMPLERS, ids=["learn2learn", "tensor"])
def sampler(request):
    """Both samplers must pass the same tests: the tensor one is a drop-in replacement."""
    return request.param


def _tasks(sampler=ClassificationTasks, **kwargs) -> ClassificationTasks:
    args = dict(images=IMAGES, classes=SPLIT, ways=4, shots=2, query_shots=3, seed=0)
    return sampler(**{**args, **kwargs})


def _equal(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors(), strict=True))


@pytest.mark.parametrize("rotations", [False, True])
def test_shapes_and_dtypes(sampler, rotations):
    tasks = _tasks(sampler, rotations=rotations)
    batch = tasks.sample(7)
    assert tasks.task_type == "classification" and tasks.input_shape == (3, SIZE, SIZE)
    assert (tasks.ways, tasks.shots, tasks.query_shots) == (4, 2, 3)
    assert batch.support_x.shape == (7, 8, 3, SIZE, SIZE) and batch.support_y.shape == (7, 8)
    assert batch.query_x.shape == (7, 12, 3, SIZE, SIZE) and batch.query_y.shape == (7, 12)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    assert 0 <= batch.support_x.min() and batch.support_x.max() == 1
    gray = sampler(IMAGES[:, :, 2], SPLIT, ways=3, shots=1, query_shots=1)
    assert gray.input_shape == (1, SIZE, SIZE)
    assert gray.sample(2).query_x.shape == (2, 3, 1, SIZE, SIZE)


@pytest.mark.parametrize("rotations", [False, True])
def test_labels_classes_and_disjoint_support_query(sampler, rotations):
    batch = _tasks(sampler, rotations=rotations).sample(50)
    s_cls, s_num, _ = _decode(batch.support_x)
    q_cls, q_num, _ = _decode(batch.query_x)
    for t in range(50):
        assert torch.equal(batch.support_y[t].bincount(), torch.full((4,), 2))
        assert torch.equal(batch.query_y[t].bincount(), torch.full((4,), 3))
        for label in range(4):  # one class per label, the same in support and query
            classes = torch.cat(
                [s_cls[t][batch.support_y[t] == label], q_cls[t][batch.query_y[t] == label]]
            ).unique()
            assert classes.tolist() == [batch.classes[t, label].item()]
        assert len(batch.classes[t].unique()) == 4 and set(batch.classes[t].tolist()) <= set(SPLIT)
        support = set(zip(s_cls[t].tolist(), s_num[t].tolist(), strict=True))
        query = set(zip(q_cls[t].tolist(), q_num[t].tolist(), strict=True))
        assert len(support) == 8 and len(query) == 12 and not support & query
    # over many tasks every class of the split and every image get used
    assert set(batch.classes.flatten().tolist()) == set(SPLIT)
    assert set(torch.cat([s_num.flatten(), q_num.flatten()]).tolist()) == set(range(PER_CLASS))


def test_same_seed_same_tasks_whatever_the_global_seeds(sampler):
    random.seed(0)
    torch.manual_seed(0)
    a = _tasks(sampler, seed=3).sample(5)
    random.seed(12345)
    torch.manual_seed(777)
    tasks = _tasks(sampler, seed=3)
    before = random.getstate()
    b = tasks.sample(5)
    assert random.getstate() == before, "sampling must not touch the global random state"
    assert _equal(a, b)
    assert not _equal(a, _tasks(sampler, seed=4).sample(5))


def test_state_dict_resumes_the_same_sequence():
    tasks = _tasks(rotations=True)
    tasks.sample(3)
    buffer = io.BytesIO()
    torch.save(tasks.state_dict(), buffer)  # as a checkpoint would store it
    expected = [tasks.sample(4), tasks.sample(2)]
    resumed = _tasks(rotations=True, seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(_equal(e, resumed.sample(len(e))) for e in expected)
    as_lists = copy.deepcopy(tasks.state_dict())
    as_lists["random"] = [list(x) if isinstance(x, tuple) else x for x in as_lists["random"]]
    resumed.load_state_dict(as_lists)  # e.g. after a round trip through JSON
    assert _equal(tasks.sample(3), resumed.sample(3))


def test_no_rotations_by_default(sampler):
    batch = _tasks(sampler).sample(20)
    assert not hasattr(batch, "quarter_turns")
    assert (_decode(batch.support_x)[2] == 0).all() and (_decode(batch.query_x)[2] == 0).all()


def test_rotation_is_drawn_per_class(sampler):
    tasks = _tasks(sampler, ways=5, shots=1, query_shots=2, rotations=True, seed=1)
    batch = tasks.sample(1000)
    s_cls, _, s_turns = _decode(batch.support_x)
    q_cls, _, q_turns = _decode(batch.query_x)
    # all images of one class in a task share that class's angle, also across support and query
    assert torch.equal(s_turns, batch.quarter_turns)
    assert torch.equal(q_turns.view(1000, 5, 2), batch.quarter_turns[:, :, None].expand(-1, -1, 2))
    assert torch.equal(q_cls.view(1000, 5, 2)[:, :, 0], s_cls)
    # classes of one task get independent angles: all 5 share one with probability (1/4)^4
    one_angle = (batch.quarter_turns == batch.quarter_turns[:, :1]).all(dim=1).float().mean()
    assert one_angle < 0.02
    # each angle has frequency 1/4: chi-square with 3 degrees of freedom, p = 0.001 cut-off
    counts = batch.quarter_turns.flatten().bincount(minlength=4).float()
    chi2 = ((counts - counts.sum() / 4) ** 2 / (counts.sum() / 4)).sum()
    assert chi2 < 16.27


def test_impossible_combinations_name_the_keys(sampler):
    big = torch.zeros(30, 20, 28, 28, dtype=torch.uint8)
    with pytest.raises(UserError, match=r"^dataset.ways=30 but the test split has 20 classes$"):
        sampler(big, range(20), ways=30, shots=1, query_shots=1, split="test")
    with pytest.raises(
        UserError,
        match=r"^dataset.shots \+ dataset.query_shots = 25 > 20 images of class 0 in the split$",
    ):
        sampler(big, range(20), ways=5, shots=5, query_shots=20)
    with pytest.raises(UserError, match="dataset.shots=0"):
        sampler(big, range(20), ways=5, shots=0, query_shots=1)


def test_tensor_sampler_draws_the_learn2learn_distribution():
    """Two-sample chi-square tests of homogeneity on what a task is made of: which classes, in
    which label position, which images, and which angles (p = 0.001 cut-offs)."""
    draws = {}
    for sampler in SAMPLERS:
        batch = _tasks(sampler, ways=3, shots=1, query_shots=2, rotations=True, seed=5).sample(3000)
        _, s_num, _ = _decode(batch.support_x)
        _, q_num, _ = _decode(batch.query_x)
        draws[sampler] = {
            "class": batch.classes.flatten(),
            "first label's class": batch.classes[:, 0],
            "support image": s_num.flatten(),
            "query image": q_num.flatten(),
            "angle": batch.quarter_turns.flatten(),
        }
    critical = {7: 24.32, 3: 16.27}  # chi-square 0.999 quantiles by degrees of freedom
    for name in draws[ClassificationTasks]:
        a, b = (draws[s][name] for s in SAMPLERS)
        bins = int(max(a.max(), b.max())) + 1
        counts = torch.stack([a.bincount(minlength=bins), b.bincount(minlength=bins)]).double()
        counts = counts[:, counts.sum(0) > 0]
        expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < critical[counts.shape[1] - 1], (name, chi2, counts)


def test_classes_of_different_sizes_draw_each_class_uniformly_and_only_its_own_images(sampler):
    """A user's folder: classes of 3 to 8 images in one flat tensor (no padding). Every drawn
    image belongs to its class, a task never repeats an image, and each class's images are drawn
    uniformly (chi-square, p = 0.001)."""
    counts = [3, 8, 5, 4, 6, 3]
    per_class = [IMAGES[c, :count] for c, count in enumerate(counts)]
    images = ClassImages.concatenated(per_class, [f"c{c}" for c in range(len(counts))])
    assert images.images.shape[0] == sum(counts)
    batch = sampler(images, range(len(counts)), ways=3, shots=1, query_shots=2, seed=3).sample(3000)
    s_cls, s_num, _ = _decode(batch.support_x.view(3000, 3, 1, 3, SIZE, SIZE))
    q_cls, q_num, _ = _decode(batch.query_x.view(3000, 3, 2, 3, SIZE, SIZE))
    cls, num = torch.cat([s_cls, q_cls], dim=2), torch.cat([s_num, q_num], dim=2)
    assert (cls == batch.classes[..., None]).all()
    assert (num < torch.tensor(counts)[cls]).all(), "an image beyond its class's count"
    key = cls * PER_CLASS + num
    assert (key.sort(dim=2).values.diff(dim=2) != 0).all(), "an image twice in one class of a task"
    for c, count in enumerate(counts):
        drawn = num[cls == c].bincount(minlength=count).double()
        chi2 = float(((drawn - drawn.mean()) ** 2 / drawn.mean()).sum())
        assert chi2 < {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}[count - 1], (c, drawn)
    with pytest.raises(UserError, match=r"= 4 > 3 images of c5 in the train split$"):
        sampler(images, [1, 2, 5], ways=3, shots=2, query_shots=2, split="train")
