"""Data-parallel meta-training (`mamlrun.run.distributed`) over gloo, with real processes.

- The meta-gradient of one global meta-batch split over 2 ranks (`MetaGradientSum`) is the one
  process's, to 1e-10 relative in float64: first and second order, both engines, the sinusoid MLP
  and the Omniglot conv4 (spawned workers, one run of them for every case).
- `torchrun --nproc-per-node=2 -m mamlrun train` trains the parameters one process trains on the
  same tasks (float32, tolerance below), agrees on eval.json, and writes one run directory.
- kill -9 of one rank ends the job (no hang) with last.pt intact; resuming the 2-rank run ends with
  the parameters of an uninterrupted 2-rank run, bit for bit.
- The environment each launcher sets is read as the world it describes; a meta-batch that does
  not divide by the world size is one line, exit 2, before any work.

Every process here runs one torch thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from wandb_offline import read_wandb_offline

from conftest import MAMLRUN, read_jsonl, relative_error
from mamlrun.errors import UserError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import conv4, mlp
from mamlrun.maml.vmap_engine import VmapEngine
from mamlrun.run import distributed
from mamlrun.run.distributed import MetaGradientSum, World

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ROOT = Path(__file__).resolve().parents[1]
# float64: the split sum and the one-process mean differ only in the order of a few additions.
SPLIT_TOLERANCE = 1e-10
# Each model: (build, task type, input shape, ways (0: regression), inner lr, global tasks).
MODELS = {
    "sinusoid_mlp": (lambda: mlp((1,), 1, hidden=[40, 40]), "regression", (1,), 0, 0.01, 4),
    "omniglot_conv4": (
        lambda: conv4((1, 28, 28), 5, filters=8),  # the paper's network, narrower: a short test
        "classification",
        (1, 28, 28),
        5,
        0.4,
        4,
    ),
}
ENGINES = {"vmap": VmapEngine, "learn2learn": Learn2LearnEngine}
CASES = [
    (model, engine, first_order)
    for model in MODELS
    for engine in ENGINES
    for first_order in (False, True)
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(input_shape, ways: int, tasks: int, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(7)
    examples = shots * max(ways, 1) * 2
    x = torch.rand(tasks, examples, *input_shape, generator=g, dtype=torch.float64)
    if ways == 0:
        y = torch.sin(x) * (1 + torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64))
    else:
        y = torch.arange(ways).repeat(tasks, examples // ways)
    half = examples // 2
    return TaskBatch(x[:, :half], y[:, :half], x[:, half:], y[:, half:])


def _gradients(name: str, engine_name: str, first_order: bool, world: World):
    """The meta-gradient and statistics of the case's global meta-batch: on `world`'s share,
    summed over the ranks (several ranks) or on the whole batch (one process)."""
    build, task_type, shape, ways, inner_lr, tasks = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    engine = ENGINES[engine_name](
        model, inner_lr=inner_lr, first_order=first_order, task_type=task_type
    )
    batch = _batch(shape, ways, tasks)
    model.zero_grad(set_to_none=True)
    stats = engine.meta_gradient(world.slice(batch), inner_steps=2, measure_before=True)
    if world.distributed:
        stats = MetaGradientSum(model.parameters(), world, tasks)(stats)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return grads, {key: float(value) for key, value in stats.items()}


def _split_worker(rank: int, size: int, port: int, out: str) -> None:
    # this rank's stderr (a C++ abort's message included) into a file the fixture reports
    os.dup2(os.open(Path(out, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT), 2)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    world = World(rank, size, rank)
    results = {}
    for case in CASES:
        grads, stats = _gradients(*case, world)
        reference, reference_stats = _gradients(*case, World())
        results["-".join(map(str, case))] = {
            "gradient": relative_error(grads, reference),
            "stats": {
                k: abs(stats[k] - ref) / max(abs(ref), 1e-12) for k, ref in reference_stats.items()
            },
            "keys": sorted(stats) == sorted(reference_stats),
        }
    results["sync"] = _sync_checks(world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # both ranks are done with their collectives
    # Leave without the interpreter's teardown: there, under load, torch's gloo and store
    # threads have aborted rank 1 ("terminate called without an active exception") after all
    # was done and written. os._exit skips those destructors.
    os._exit(0)


def _sync_checks(world: World) -> list[str]:
    """What `check_in_sync` says of equal ranks, then of parameters and of a sampler state that
    differ on rank 1 (every rank must raise, not only the one that differs)."""
    torch.manual_seed(0)
    model = mlp((1,), 1, hidden=[8])
    said = []
    for change in (None, "parameters", "state"):
        state = {"generator": torch.Generator().manual_seed(1).get_state()}
        if change == "parameters" and world.rank == 1:
            with torch.no_grad():
                next(model.parameters())[0] += 1e-7
        if change == "state" and world.rank == 1:
            state["generator"] = torch.Generator().manual_seed(2).get_state()
        try:
            distributed.check_in_sync(model, world, 10, state)
            said.append("in sync")
        except RuntimeError as err:
            said.append(str(err).split(";")[0])
        distributed.broadcast_parameters(model, world)
    return said


@pytest.fixture(scope="module")
def split_errors(tmp_path_factory):
    """Relative errors of the 2-rank meta-gradient against one process's, per case and rank."""
    out = tmp_path_factory.mktemp("split")
    try:
        mp.spawn(_split_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as err:  # a crash; a raised exception shows its traceback
        said = {p.name: p.read_text()[-2000:] for p in sorted(out.glob("rank*.err"))}
        raise AssertionError(f"{err}; the ranks' stderr: {said}") from err
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_a_meta_batch_split_over_two_ranks_has_the_meta_gradient_of_one_process(split_errors, case):
    key = "-".join(map(str, case))
    for rank, errors in enumerate(split_errors):
        result = errors[key]
        assert result["keys"], (rank, key)
        assert result["gradient"] < SPLIT_TOLERANCE, (rank, key, result)
        for stat, error in result["stats"].items():
            # accuracy is counted in float32 by the engines: its mean rounds at float32's 6e-8
            tolerance = (
                1e-6
                if stat.startswith("metric") and case[0] == "omniglot_conv4"
                else SPLIT_TOLERANCE
            )
            assert error < tolerance, (rank, key, stat, error)


def test_ranks_whose_parameters_or_sampler_states_differ_are_caught(split_errors):
    for errors in split_errors:
        assert errors["sync"][0] == "in sync"
        assert errors["sync"][1].startswith("iteration 10: the ranks' parameters differ")
        assert errors["sync"][2] == "iteration 10: the ranks' task sampler or RNG states differ"


def test_the_split_sum_differs_from_one_ranks_own_tasks():
    """The check above has teeth: one rank's own tasks give another meta-gradient."""
    grads, _ = _gradients("sinusoid_mlp", "vmap", False, World())
    build, task_type, shape, ways, inner_lr, tasks = MODELS["sinusoid_mlp"]
    torch.manual_seed(0)
    model = build().double()
    engine = VmapEngine(model, inner_lr=inner_lr, first_order=False, task_type=task_type)
    engine.meta_gradient(_batch(shape, ways, tasks).slice(0, tasks // 2), inner_steps=2)
    half = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(half, grads) > 1e-3


# --------------------------------------------------------------------- environment and shares


def test_each_launchers_environment_is_read_as_its_world():
    assert distributed.detect({}) == World()
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert distributed.detect(torchrun) == World(1, 4, 1)
    step = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1"}
    assert distributed.detect(step) == World(3, 4, 1)
    # the batch script of a 2-task job runs once, as task 0: one process, not rank 0 of 2
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert distributed.detect(batch_script) == World()


def test_a_slurm_step_rendezvous_on_its_first_node_and_a_port_of_its_job():
    env = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "node7,node8"}
    distributed.rendezvous(env)
    assert env["MASTER_ADDR"] == "node7"
    assert env["MASTER_PORT"] == str(distributed.PORT_BASE + 12345 % distributed.PORT_SPAN)
    # no job's port is one the kernel hands out to connections (gloo's, a store's) at random
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert distributed.PORT_BASE + distributed.PORT_SPAN <= int(ephemeral[0])
    given = {"SLURM_JOB_ID": "1", "MASTER_ADDR": "head", "MASTER_PORT": "999"}
    distributed.rendezvous(given)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("head", "999")


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this machine has a GPU per rank")
def test_more_cuda_ranks_on_a_node_than_gpus_is_one_line():
    gpus = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"on a node with {gpus} GPU.*at most {gpus} rank"):
        distributed.device_for("cuda", World(1, 2, 1))
    assert distributed.device_for("cpu", World(1, 2, 1)) == "cpu"


def test_shares_cover_the_tasks_in_order():
    for size in (1, 2, 3):
        shares = [World(rank, size).share(10) for rank in range(size)]
        assert [i for s in shares for i in range(10)[s]] == list(range(10))


def test_a_meta_batch_that_does_not_divide_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [*MAMLRUN, "train", "algorithm.meta_batch_size=25", "logger=none", "print_config=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "mamlrun train: error: algorithm.meta_batch_size=25 does not divide by the world size 2; "
        "use a multiple of 2 or launch a divisor of 25 processes"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- real training runs

# 300 iterations of sinusoid MAML with a meta-batch of 8; validation and test on few tasks.
RUN = [
    "train.iterations=300",
    "algorithm.meta_batch_size=8",
    "train.log_every=50",
    "train.val_every=100",
    "train.val_tasks=10",
    "train.checkpoint_every=50",
    "eval.tasks=20",
    "eval.plot_tasks=0",
    "logger=none",
    "print_config=false",
    "hardware.threads=1",
]
# float32: the 2-rank sum of half-batch means rounds differently from the 1-process mean, and
# 300 Adam steps carry that along: measured at 1.4e-7 relative (the largest tensor), eval.json's
# means at 2.6e-8; the bound leaves a margin for other CPUs' rounding.
TRAIN_TOLERANCE = 1e-5


def _env(timeout_s: int = 30) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env[distributed.TIMEOUT_ENV] = str(timeout_s)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("WANDB_MODE", None)
    return env


def _torchrun(args: list[str], cwd: Path, timeout_s: int = 30, **popen) -> subprocess.Popen:
    command = [
        *TORCHRUN,
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "mamlrun",
        "train",
        *args,
    ]
    return subprocess.Popen(command, cwd=cwd, env=_env(timeout_s), text=True, **popen)


def _run(args: list[str], cwd: Path, ranks: int) -> None:
    if ranks == 2:
        process = _torchrun(args, cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    else:
        command = [*MAMLRUN, "train", *args]
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same run trained by 2 ranks (torchrun; its run directory from Hydra's timestamp) and
    by one process."""
    root = tmp_path_factory.mktemp("runs")
    (root / "two").mkdir()
    _run(RUN, root / "two", ranks=2)
    (two,) = (root / "two/outputs/train").iterdir()
    _run([*RUN, f"hydra.run.dir={root / 'one'}"], root, ranks=1)
    return two, root / "one"


def test_two_ranks_train_the_parameters_of_one_process(two_runs):
    two, one = two_runs
    ours, theirs = _weights(two), _weights(one)
    for name, tensor in theirs.items():
        assert relative_error(ours[name], tensor) < TRAIN_TOLERANCE, name
    rows, reference = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [(r["iteration"], r["split"]) for r in rows] == [
        (r["iteration"], r["split"]) for r in reference
    ]
    for row, expected in zip(rows, reference, strict=True):
        for key, value in expected.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=TRAIN_TOLERANCE), (row, key)


def test_two_ranks_agree_with_one_process_on_eval_json(two_runs):
    two, one = two_runs
    ours, theirs = (json.loads((d / "eval.json").read_text()) for d in two_runs)
    assert ours["tasks"] == theirs["tasks"] == 20
    for label, result in theirs["results"].items():
        for stat in ("mean", "median", "std"):
            assert ours["results"][label]["mse"][stat] == pytest.approx(
                result["mse"][stat], rel=TRAIN_TOLERANCE
            ), (label, stat)


def test_rank_0_alone_writes_one_run_directory(two_runs):
    two, _ = two_runs
    assert len(list(two.parent.iterdir())) == 1, "the ranks agreed on one run directory"
    (attempt,) = json.loads((two / "job.json").read_text())["attempts"]
    assert attempt["world_size"] == 2
    assert torch.load(two / "checkpoints/last.pt", weights_only=True)["world_size"] == 2
    assert not list(two.glob(".*.tmp"))


def _workers(agent: int) -> list[int]:
    """The worker processes torchrun's agent started (its children), by pid."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    return [int(pid) for pid in children]


def test_kill_9_of_one_rank_ends_the_job_and_its_resume_equals_an_uninterrupted_run(
    two_runs, tmp_path
):
    """Two ranks are killed one of them (-9) after a checkpoint; the job ends with an error, the
    checkpoint loads, and resume=auto in the same directory finishes to the weights of the
    uninterrupted 2-rank run above."""
    run_dir = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run_dir}", "train.iterations=100000"]
    log = (tmp_path / "killed.log").open("w")
    job = _torchrun(args, tmp_path, stdout=log, stderr=log)
    last = run_dir / "checkpoints/last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        assert job.poll() is None and time.monotonic() < deadline, (
            tmp_path / "killed.log"
        ).read_text()
        time.sleep(0.2)
    time.sleep(0.3)  # mid-run, past the first checkpoint
    workers = _workers(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0, "the job fails, it does not hang"
    log.close()
    state = torch.load(last, weights_only=True)
    assert state["iteration"] % 50 == 0 and 0 < state["iteration"] < 300
    # the same run to 300 iterations: continues from the checkpoint
    _run([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, ranks=2)
    assert json.loads((run_dir / "job.json").read_text())["attempts"][-1]["start_iteration"] > 0
    reference, _ = two_runs
    for name, tensor in _weights(reference).items():
        assert torch.equal(_weights(run_dir)[name], tensor), name


def test_a_two_rank_run_resumed_by_one_process_continues_it(two_runs, tmp_path):
    """Every rank draws the same task stream, so another world size may continue a run: 2 ranks
    to iteration 100, then one process to 300, end with one process's parameters (float32
    rounding of the 2-rank steps aside). The 2 ranks log to W&B (offline): one run, rank 0's."""
    run_dir = tmp_path / "run"
    first = [*RUN, f"hydra.run.dir={run_dir}", "train.iterations=100", "train.eval_at_end=false"]
    _run([*first, "logger=wandb", "logger.mode=offline"], tmp_path, ranks=2)
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_wandb_offline(wandb_run)["history"]
    assert [row["train/loss_post"] for row in history if "train/loss_post" in row] == [
        row["loss_post"] for row in read_jsonl(run_dir / "metrics.jsonl") if row["split"] == "train"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "nothing written outside the run"
    _run([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, ranks=1)
    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert [(a["start_iteration"], a["world_size"]) for a in attempts] == [(0, 2), (100, 1)]
    _, one = two_runs
    ours = _weights(run_dir)
    for name, tensor in _weights(one).items():
        assert relative_error(ours[name], tensor) < TRAIN_TOLERANCE, name


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_iteration(tmp_path):
    """SIGTERM to rank 1 alone (a preemption's signal reaching the ranks at different times):
    its flag travels with the next meta-gradient, both ranks stop after that iteration, rank 0
    writes last.pt for it (the kill -9 test above proves such a last.pt resumes exactly)."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "stopped.log"
    with log_path.open("w") as log:
        job = _torchrun([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints/last.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        os.kill(_workers(job.pid)[-1], signal.SIGTERM)
        assert job.wait(timeout=120) != 0
    stopped = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["iteration"]
    assert 0 < stopped < 300
    assert f"stopped by SIGTERM after iteration {stopped:,};" in log_path.read_text()


def test_torchruns_ranks_on_a_node_share_its_cores(monkeypatch):
    from mamlrun.run.runtime import default_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("MAMLRUN_CONCURRENT_JOBS", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_threads() == cores


def test_a_rank_waiting_for_a_peer_that_stopped_answering_times_out(tmp_path):
    """SIGSTOP of rank 1 (alive, its sockets open: no error reaches rank 0): rank 0's next
    collective fails after $MAMLRUN_DIST_TIMEOUT (5 s here) instead of waiting forever."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "stalled.log"
    with log_path.open("w") as log:
        args = [*RUN, f"hydra.run.dir={run_dir}", "train.iterations=100000"]
        job = _torchrun(args, tmp_path, timeout_s=5, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints/last.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        rank0, rank1 = _workers(job.pid)
        os.kill(rank1, signal.SIGSTOP)
        try:
            while Path(f"/proc/{rank0}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.kill(rank1, signal.SIGCONT)  # so that torchrun's agent can end it
        assert job.wait(timeout=120) != 0
    assert "Timed out waiting 5000ms" in log_path.read_text()
