"""Every engine satisfies `mamlrun.maml.engine.Engine` and trains through `MetaStep`; the check
itself fails for a class that lacks any one member."""

import pytest
import torch

from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.engine import Engine
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import mlp
from mamlrun.maml.pretrain import PretrainEngine
from mamlrun.maml.step import MetaStep, read_stats
from mamlrun.maml.vmap_engine import VmapEngine

# name -> engine over a fresh sinusoid MLP
ENGINES = {
    "learn2learn": lambda model: Learn2LearnEngine(model, inner_lr=0.01),
    "vmap": lambda model: VmapEngine(model, inner_lr=0.01),
    "vmap-batching-vmap": lambda model: VmapEngine(model, inner_lr=0.01, batching="vmap"),
    "pretrain-learn2learn": lambda model: PretrainEngine(Learn2LearnEngine(model, inner_lr=0.01)),
    "pretrain-vmap": lambda model: PretrainEngine(VmapEngine(model, inner_lr=0.01)),
}
CAPTURABLE = {"vmap", "vmap-batching-vmap"}

# Every member of the protocol, as the stand-ins below define them.
MEMBERS = {
    "model": torch.nn.Linear(1, 1),
    "task_type": "regression",
    "loss_fn": torch.nn.functional.mse_loss,
    "metric_fn": torch.nn.functional.mse_loss,
    "metric_name": "mse",
    "higher_is_better": False,
    "capturable": False,
    "meta_gradient": lambda self, batch, inner_steps, measure_before=True: {},
    "meta_backward": lambda self, batch, inner_steps, measure_before=True: {},
    "task_outputs": lambda self, x: x,
    "task_mean": lambda self, fn, outputs, targets: fn(outputs, targets),
    "adaptation_curve": lambda self, batch, steps: {},
    "predictions": lambda self, support_x, support_y, x, steps: {},
}


def _engine(name: str):
    torch.manual_seed(0)
    return ENGINES[name](mlp((1,), 1, hidden=[20, 20]))


@pytest.mark.parametrize("name", ENGINES)
def test_engine_is_an_engine_and_trains_through_meta_step(name):
    engine = _engine(name)
    assert isinstance(engine, Engine)
    assert engine.capturable == (name in CAPTURABLE)
    before = [p.detach().clone() for p in engine.model.parameters()]
    step = MetaStep(engine, torch.optim.Adam(engine.model.parameters(), lr=1e-3), grad_clip=10.0)
    tasks = SinusoidTasks(5, 5, seed=1)
    stats = read_stats([step(tasks.sample(4), 1, measure_before=i == 1) for i in range(2)])
    every = {"loss_pre", "loss_post", "metric_pre", "metric_post", "nonfinite"}
    post = {"loss_post", "metric_post", "nonfinite"}  # MetaStep adds its non-finite flag
    # the baseline does not adapt: its "before" is its "after", always reported
    assert set(stats[0]) == (every if name.startswith("pretrain") else post)
    assert set(stats[1]) == every
    assert all(s["nonfinite"] == 0 for s in stats)
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in stats)
    after = list(engine.model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    # test time goes through the same members
    curve = engine.adaptation_curve(tasks.sample(3), steps=2)
    assert curve["loss"].shape == curve[engine.metric_name].shape == (3, 3)
    batch = tasks.sample(1)
    predictions = engine.predictions(batch.support_x[0], batch.support_y[0], batch.query_x[0], [0])
    assert predictions[0].shape == batch.query_y[0].shape


@pytest.mark.parametrize("name", sorted(set(ENGINES) - CAPTURABLE))
def test_cuda_graph_is_refused_for_an_engine_that_is_not_capturable(name):
    engine = _engine(name)
    with pytest.raises(UserError, match="cuda_graphs"):
        MetaStep(engine, torch.optim.Adam(engine.model.parameters()), cuda_graph=True)


@pytest.mark.parametrize("base", ["learn2learn", "vmap"])
def test_task_outputs_are_each_task_on_its_own(base):
    engine = _engine(base)
    x = torch.randn(3, 7, 1)
    outputs = engine.task_outputs(x)
    assert outputs.requires_grad  # the pretrained baseline trains on them
    for task_x, task_outputs in zip(x, outputs, strict=True):
        torch.testing.assert_close(task_outputs, engine.model(task_x))
    targets = torch.randn(3, 7, 1)
    mean = engine.task_mean(engine.loss_fn, outputs, targets)
    per_task = torch.stack([engine.loss_fn(o, t) for o, t in zip(outputs, targets, strict=True)])
    torch.testing.assert_close(mean, per_task.mean())


def test_the_stand_ins_define_every_member_of_the_protocol():
    declared = set(Engine.__annotations__) | {n for n in vars(Engine) if not n.startswith("_")}
    assert set(MEMBERS) == declared


def test_a_complete_stand_in_is_an_engine():
    assert isinstance(type("Complete", (), MEMBERS)(), Engine)


@pytest.mark.parametrize("missing", MEMBERS)
def test_a_stand_in_missing_one_member_is_not_an_engine(missing):
    incomplete = type("Incomplete", (), {k: v for k, v in MEMBERS.items() if k != missing})
    assert not isinstance(incomplete(), Engine)
