"""The training step (`mamlrun.maml.step`): statistics left on the device until read, optimizer
state that survives a switch between captured (GPU) and eager (CPU) runs, and clear refusals.
The CUDA-graph replay itself is checked against the eager step in tests/test_gpu.py."""

import copy
import math

import pytest
import torch

from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import mlp
from mamlrun.maml.step import (
    MetaStep,
    can_be_captured,
    masked_restore,
    read_stats,
    set_capturable,
)
from mamlrun.maml.vmap_engine import VmapEngine


def _engine(seed: int = 0) -> VmapEngine:
    torch.manual_seed(seed)
    return VmapEngine(mlp((1,), 1, hidden=[40, 40]), inner_lr=0.01)


def _run(step: MetaStep, tasks: SinusoidTasks, iterations: int) -> list[dict[str, float]]:
    return read_stats([step(tasks.sample(5), 1, measure_before=i == 0) for i in range(iterations)])


def test_statistics_are_device_tensors_until_read():
    engine, twin = _engine(), _engine()
    batch = SinusoidTasks(5, 5, seed=1).sample(4)
    stats = MetaStep(engine, torch.optim.Adam(engine.model.parameters()))(batch, 1, True)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert set(stats) == {"loss_pre", "loss_post", "metric_pre", "metric_post", "nonfinite"}
    assert stats["nonfinite"].item() == 0
    (read,) = read_stats([stats])
    assert read.pop("nonfinite") == 0
    assert read == pytest.approx(twin.meta_backward(batch, 1), rel=1e-6)
    assert read["loss_post"] < read["loss_pre"]  # one inner step on the support set helps


def test_optimizer_state_of_a_captured_run_resumes_on_a_cpu():
    """A checkpoint of a `hardware.cuda_graphs=true` run holds a capturable Adam; capturable
    Adam refuses CPU parameters, so the CPU run switches it off and continues exactly."""
    engine = _engine()
    tasks = SinusoidTasks(5, 5, seed=2)
    step = MetaStep(engine, torch.optim.Adam(engine.model.parameters(), lr=0.01))
    _run(step, tasks, 3)
    saved_model = copy.deepcopy(engine.model.state_dict())
    saved = copy.deepcopy(step.optimizer.state_dict())
    saved_tasks = tasks.state_dict()
    expected = _run(step, tasks, 3)  # the uninterrupted run

    for group in saved["param_groups"]:  # as a captured run's checkpoint has it
        group["capturable"] = True
    resumed = _engine()
    resumed.model.load_state_dict(saved_model)
    optimizer = torch.optim.Adam(resumed.model.parameters(), lr=0.01)
    optimizer.load_state_dict(saved)
    for param in resumed.model.parameters():
        param.grad = torch.zeros_like(param)
    with pytest.raises(AssertionError, match="capturable=True"):  # what the switch prevents
        optimizer.step()  # refused before it changes any state
    tasks.load_state_dict(saved_tasks)
    assert _run(MetaStep(resumed, optimizer), tasks, 3) == expected  # CPU: bit for bit
    for a, b in zip(engine.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graphs_refuse_what_cannot_be_captured():
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = torch.optim.Adam(params)
    set_capturable(adam, True)
    assert adam.param_groups[0]["capturable"]
    set_capturable(torch.optim.SGD(params, lr=0.1), True)  # no host state: nothing to switch
    assert can_be_captured(adam) and not can_be_captured(torch.optim.Adagrad(params))
    with pytest.raises(UserError, match="^hardware.cuda_graphs=true: Adagrad cannot be captured"):
        set_capturable(torch.optim.Adagrad(params), True)
    model = mlp((1,), 1, hidden=[8])
    with pytest.raises(UserError, match="needs algorithm.engine=vmap"):
        MetaStep(Learn2LearnEngine(model, 0.01), torch.optim.Adam(model.parameters()), None, True)


def _poisoned(batch: TaskBatch) -> TaskBatch:
    """The batch with a NaN query target: a NaN meta-loss and meta-gradient."""
    query_y = batch.query_y.clone()
    query_y[0, 0] = math.nan
    return TaskBatch(batch.support_x, batch.support_y, batch.query_x, query_y)


def _snapshot(step: MetaStep) -> tuple[dict, dict]:
    return copy.deepcopy(step.engine.model.state_dict()), copy.deepcopy(step.optimizer.state_dict())


def _assert_same(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=False)


@pytest.mark.parametrize("finite_steps", [3, 0])
def test_a_skipped_nonfinite_step_leaves_parameters_and_adam_state_unchanged(finite_steps):
    """After 3 steps the masked update (what a CUDA graph replays) runs; before the first step
    Adam has no state and the host skips `optimizer.step()`. Either way the bad step is not
    applied: the next finite step is bit for bit a run's that never saw it."""
    engine, twin = _engine(), _engine()
    steps = [
        MetaStep(e, torch.optim.Adam(e.model.parameters(), lr=0.01), skip_nonfinite=True)
        for e in (engine, twin)
    ]
    tasks = SinusoidTasks(5, 5, seed=3)
    batches = [tasks.sample(4) for _ in range(finite_steps + 1)]
    for step in steps:
        _run_batches(step, batches[:finite_steps])
    before = _snapshot(steps[0])
    stats = steps[0](_poisoned(batches[-1]), 1, measure_before=False)
    assert stats["nonfinite"].item() == 1
    _assert_same(_snapshot(steps[0]), before)  # parameters, exp_avg, exp_avg_sq, step count
    for step in steps:
        _run_batches(step, batches[-1:])
    _assert_same(_snapshot(steps[0]), _snapshot(steps[1]))
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())


def _run_batches(step: MetaStep, batches: list[TaskBatch]) -> None:
    for batch in batches:
        assert step(batch, 1, measure_before=False)["nonfinite"].item() == 0


def test_an_inf_meta_gradient_is_caught_before_clipping():
    """Clipping would turn an inf gradient element into a finite one: the check comes first."""
    engine = _engine()
    optimizer = torch.optim.SGD(engine.model.parameters(), lr=0.1)
    step = MetaStep(engine, optimizer, grad_clip=1.0, skip_nonfinite=True)
    batch = SinusoidTasks(5, 5, seed=4).sample(2)
    support_x = batch.support_x.clone()
    support_x[0, 0] = 1e30  # finite input, overflowing activations in the inner step
    before = _snapshot(step)
    stats = step(TaskBatch(support_x, *batch.tensors()[1:]), 1, measure_before=False)
    assert stats["nonfinite"].item() == 1
    _assert_same(_snapshot(step), before)


def test_under_stop_a_nonfinite_step_is_flagged_and_the_state_check_sees_it():
    """`stop` applies the step (the run ends before any write): its loss flags it, and
    `state_is_finite`, which the trainer calls before writing, sees the spoiled parameters."""
    engine = _engine()
    step = MetaStep(engine, torch.optim.Adam(engine.model.parameters(), lr=0.01))
    tasks = SinusoidTasks(5, 5, seed=3)
    _run_batches(step, [tasks.sample(4)])
    assert step.state_is_finite()
    assert step(_poisoned(tasks.sample(4)), 1, measure_before=False)["nonfinite"].item() == 1
    assert not step.state_is_finite()


def test_masked_restore_keeps_new_values_only_when_told():
    tensors, saved = [torch.tensor([1.0, math.nan])], [torch.tensor([1.0, 2.0])]
    masked_restore(tensors, saved, torch.tensor(False))
    _assert_same(tensors[0], torch.tensor([1.0, 2.0]))
    tensors = [torch.tensor([3.0, -0.0])]
    masked_restore(tensors, saved, torch.tensor(True))
    assert tensors[0].tolist() == [3.0, -0.0] and math.copysign(1, tensors[0][1]) < 0
