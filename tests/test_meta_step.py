"""The training step (`mamlrun.maml.step`): statistics left on the device until read, optimizer
state that survives a switch between captured (GPU) and eager (CPU) runs, and clear refusals.
The CUDA-graph replay itself is checked against the eager step in tests/test_gpu.py."""

import copy

import pytest
import torch

from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import mlp
from mamlrun.maml.step import MetaStep, can_be_captured, read_stats, set_capturable
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
    assert set(stats) == {"loss_pre", "loss_post", "metric_pre", "metric_post"}
    (read,) = read_stats([stats])
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
