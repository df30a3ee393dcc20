import math

import pytest
import torch

from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.errors import UserError


def test_sinusoid_tasks_follow_the_paper_distribution():
    batch = SinusoidTasks(shots=10, query_shots=7, seed=0).sample(500)
    assert batch.support_x.shape == (500, 10, 1) and batch.query_x.shape == (500, 7, 1)
    assert batch.amplitude.min() >= 0.1 and batch.amplitude.max() <= 5.0
    assert batch.phase.min() >= 0 and batch.phase.max() <= math.pi
    assert batch.support_x.abs().max() <= 5.0
    expected = batch.amplitude.view(-1, 1, 1) * torch.sin(
        batch.query_x - batch.phase.view(-1, 1, 1)
    )
    torch.testing.assert_close(batch.query_y, expected)
    # support and query points are drawn separately
    assert not torch.equal(batch.support_x[:, :7], batch.query_x)


def test_sinusoid_sampling_is_seeded_by_the_sampler_not_global_rng():
    torch.manual_seed(1)
    a = SinusoidTasks(shots=5, query_shots=5, seed=3).sample(4)
    torch.manual_seed(2)
    b = SinusoidTasks(shots=5, query_shots=5, seed=3).sample(4)
    c = SinusoidTasks(shots=5, query_shots=5, seed=4).sample(4)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)


def test_sampler_state_round_trip_continues_the_sequence():
    sampler = SinusoidTasks(shots=5, query_shots=5, seed=0)
    sampler.sample(3)
    state = sampler.state_dict()
    expected = sampler.sample(3)
    restored = SinusoidTasks(shots=5, query_shots=5, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(3).support_y, expected.support_y)


def test_sampler_state_from_another_device_type_is_refused_in_one_line():
    """A CUDA generator's state is its seed and offset (16 bytes); a CPU generator cannot
    continue that stream, so resuming a GPU run on a CPU says so instead of failing in torch."""
    cuda_state = torch.cat([torch.tensor([7]), torch.tensor([4096])]).view(torch.uint8)
    sampler = SinusoidTasks(shots=5, query_shots=5, seed=0)
    with pytest.raises(UserError, match="another device type than cpu; resume with the hardware"):
        sampler.load_state_dict({"generator": cuda_state})


def test_query_grid_spans_the_input_range_evenly():
    batch = SinusoidTasks(shots=5, query_shots=5, seed=0, query_grid=100).sample(2)
    grid = batch.query_x[0, :, 0]
    assert grid.shape == (100,) and grid[0] == -5.0 and grid[-1] == 5.0
    torch.testing.assert_close(grid, torch.linspace(-5, 5, 100))
