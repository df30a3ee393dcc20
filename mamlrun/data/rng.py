"""Restoring a task sampler's own random generator from a checkpoint."""

from __future__ import annotations

import torch

from mamlrun.errors import UserError


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Set a sampler's generator to a saved state.

    Raises:
        UserError: the state comes from a generator of another device type (a CUDA run resumed
            on a CPU or back): the two draw different streams, so the run could not continue
            the tasks it would have drawn.
    """
    if state.numel() != generator.get_state().numel():
        raise UserError(
            f"resume=: the checkpoint's task sampler drew its tasks on another device type than "
            f"{generator.device.type}; resume with the hardware the run was trained on"
        )
    generator.set_state(state.cpu())
