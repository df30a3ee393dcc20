"""Wall time of one sweep of sinusoid runs (`seed=0..N-1`) under three launchers, side by side.

    .venv/bin/python scripts/bench_sweep.py [--jobs 4] [--iterations 3000] [--rounds 1]

- `basic`: Hydra's default launcher, one job after another (what `mamlrun train -m` does without
  a launcher);
- `joblib`: Hydra's own joblib launcher, what a user installs by hand: jobs at once, each with
  `hardware.threads=0` taking every core, so they compete for them;
- `parallel`: mamlrun's preset over joblib, whose jobs divide the cores among themselves.

Each round runs the three in turn (order rotated per round) into fresh sweep directories; the
table gives each one's median wall time and its speed-up over `basic`. Results go to
docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib"],
    "parallel": ["hydra/launcher=parallel"],
}


def sweep_seconds(launcher: str, jobs: int, iterations: int, work: Path) -> float:
    seeds = ",".join(str(seed) for seed in range(jobs))
    args = [
        sys.executable,
        "-m",
        "mamlrun",
        "train",
        "-m",
        f"seed={seeds}",
        f"train.iterations={iterations}",
        "eval.tasks=100",
        "logger=none",
        "print_config=false",
        f"hydra.sweep.dir={tempfile.mkdtemp(dir=work, prefix=launcher + '-')}",
        *LAUNCHERS[launcher],
    ]
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, cwd=work)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    names = list(LAUNCHERS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(options.rounds):
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                seconds[name].append(
                    sweep_seconds(name, options.jobs, options.iterations, Path(tmp))
                )
    cores = len(os.sched_getaffinity(0))
    print(
        f"{options.jobs}-job sinusoid sweep, {options.iterations} iterations per job, "
        f"{cores} cores, {options.rounds} round(s)"
    )
    basic = statistics.median(seconds["basic"])
    print(f"{'launcher':<10} {'wall s':>8} {'vs basic':>9}")
    for name in names:
        median = statistics.median(seconds[name])
        print(f"{name:<10} {median:>8.1f} {basic / median:>8.2f}x")


if __name__ == "__main__":
    main()
