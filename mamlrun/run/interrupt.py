"""Stopping a run cleanly on a signal: finish the iteration, checkpoint it, say how to continue.

SIGINT (Ctrl-C), SIGTERM (`kill`, SLURM's cancel, preemption and requeue) and SIGUSR2 (the signal
submitit asks SLURM to send before a job's time limit) only set a flag; the training loop reads
it after each iteration, writes `checkpoints/last.pt` for that iteration and raises `Interrupted`.
A second SIGINT raises KeyboardInterrupt at once (every write is atomic: nothing half-written is
ever read back).

Handlers that were installed before (submitit's, in a SLURM job: SIGUSR2 checkpoints the job's
submission and requeues it) are restored afterwards and, once the checkpoint is written, called
(`Interrupted.chain`): the requeued job then starts where this one stopped (`resume=auto`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from mamlrun import console
from mamlrun.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(UserError):
    """The run stopped on a signal after writing its checkpoint; exit status 128 + signal."""

    def __init__(self, message: str, signum: int, previous: Any = None) -> None:
        super().__init__(message)
        self.signum, self.previous = signum, previous

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def chains(self) -> bool:
        """The signal had a handler of its own before the run (submitit's, in a SLURM job):
        Python's Ctrl-C handler and the defaults are only what the run replaced."""
        previous = self.previous
        return callable(previous) and previous is not signal.default_int_handler

    def chain(self) -> None:
        """Call that handler (submitit's SIGUSR2 handler requeues the job and exits)."""
        if self.chains:
            self.previous(self.signum, None)


class StopRequests:
    """While active, the signals above ask the run to stop; `signum` says which came first.

    Example:
        >>> with StopRequests() as stop:
        ...     for iteration in range(n):
        ...         step()
        ...         if stop.signum is not None:
        ...             break
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # only there can Python
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
            console.info(
                f"{signal.Signals(signum).name}: stopping after this iteration, with a "
                f"checkpoint{again}"
            )

    def interrupted(self, iteration: int, checkpoint: str, run_dir: str) -> Interrupted:
        """The exception that ends the run, once `checkpoint` holds `iteration`."""
        assert self.signum is not None
        name = signal.Signals(self.signum).name
        return Interrupted(
            f"stopped by {name} after iteration {iteration:,}; {checkpoint} holds it; continue "
            f"with: mamlrun train resume={run_dir}",
            self.signum,
            self.previous.get(self.signum),
        )
