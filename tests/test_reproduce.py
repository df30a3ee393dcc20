"""The pretrained baseline, `budget`, `mamlrun reproduce` and `mamlrun report`."""

import copy
import csv
import json
import signal
import subprocess
import time
from importlib import resources

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import MAMLRUN, QUICK, in_process, refused, run_mamlrun
from mamlrun.analysis.reproduce import _duration
from mamlrun.analysis.throughput import device_throughput
from mamlrun.config.schema import Algorithm, Hardware, MLPModel, SinusoidDataset
from mamlrun.config.validate import validate
from mamlrun.errors import ConfigError
from mamlrun.maml.batch import TaskBatch
from mamlrun.maml.l2l_engine import Learn2LearnEngine
from mamlrun.maml.models import mlp
from mamlrun.maml.pretrain import PretrainEngine
from mamlrun.maml.vmap_engine import VmapEngine
from mamlrun.run.build import engine_for, meta_optimizer, model_for, task_sampler

# A reproduce run in seconds: 14 of 70,000 iterations, 20 test tasks.
TINY = [
    "budget=0.0002",
    "logger=none",
    "print_config=false",
    "train.val_tasks=20",
    "eval.tasks=20",
    "eval.plot_tasks=1",
]


@pytest.mark.parametrize("engine_name", ["vmap", "learn2learn"])
def test_pretrain_engine_fits_all_tasks_and_adapts_exactly_like_maml(engine_name):
    dataset = SinusoidDataset()
    torch.manual_seed(0)
    model = model_for(MLPModel(), dataset)
    algorithm = Algorithm(name="pretrain", inner_steps=0, engine=engine_name)
    engine = engine_for(model, algorithm, dataset, Hardware())
    assert isinstance(engine, PretrainEngine)
    tasks = task_sampler(dataset, "train", seed=0)

    # The gradient is that of plain MSE on every point (support and query) of every task.
    batch = tasks.sample(5)
    stats = engine.meta_backward(batch, inner_steps=0)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    torch.nn.functional.mse_loss(model(x.flatten(0, 1)), y.flatten(0, 1)).backward()
    for grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad)
    assert set(stats) == {"loss_pre", "loss_post", "metric_pre", "metric_post"}
    assert stats["loss_pre"] == stats["loss_post"] == stats["metric_post"]

    # Its supervised loss falls (measured on fixed held-out tasks: batches are noisy).
    held_out = task_sampler(dataset, "val", seed=2).sample(200)
    before = engine.adaptation_curve(held_out, 0)["mse"].mean()
    optimizer = meta_optimizer(model, Algorithm(meta_lr=0.003))
    for _ in range(150):
        optimizer.zero_grad()
        engine.meta_backward(tasks.sample(25), inner_steps=0)
        optimizer.step()
    after = engine.adaptation_curve(held_out, 0)["mse"].mean()
    assert after < 0.9 * before, (before, after)

    # At test time it is MAML: same fine-tuning steps, same numbers.
    maml = engine_for(model, Algorithm(name="maml", engine=engine_name), dataset, Hardware())
    test = task_sampler(dataset, "test", seed=1, shots=5).sample(4)
    ours, theirs = engine.adaptation_curve(test, 3), maml.adaptation_curve(test, 3)
    assert torch.equal(ours["mse"], theirs["mse"])
    assert not torch.equal(ours["mse"][:, 3], ours["mse"][:, 0]), "fine-tuning must change it"
    support_x, support_y, query_x, _ = test.task(0)
    assert torch.equal(
        engine.predictions(support_x, support_y, query_x, [2])[2],
        maml.predictions(support_x, support_y, query_x, [2])[2],
    )


def test_pretrain_on_the_vmap_engine_normalizes_each_task_on_its_own():
    """The vmap engine batches all tasks into one call; batch norm must still see one task at a
    time, as in the learn2learn engine's per-task loop: same loss and gradients."""
    torch.manual_seed(0)
    model = mlp((1, 28, 28), 5, hidden=[32, 16], batch_norm=True).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 10, 1, 28, 28, generator=g, dtype=torch.float64)
    x[1] *= 5  # tasks with different statistics: pooled batch norm would differ
    y = torch.randint(0, 5, (3, 10), generator=g)
    batch = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    results = []
    for Engine in (Learn2LearnEngine, VmapEngine):
        twin = copy.deepcopy(model)
        engine = PretrainEngine(Engine(twin, inner_lr=0.1, task_type="classification"))
        stats = engine.meta_backward(batch, inner_steps=0)
        results.append((stats, [p.grad for p in twin.parameters()]))
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual == pytest.approx(expected, rel=1e-12)
    for grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_budget_scales_iterations_and_is_validated():
    with initialize_config_module("mamlrun.conf", version_base="1.3"):
        typed = validate(compose("train", ["experiment=finn2017/sinusoid_pretrained"]))
        assert typed.budget == 1.0 and typed.train.iterations == 70000
        assert typed.algorithm.name == "pretrain" and typed.paper.value == [2.41, 2.23, 2.19]
        assert validate(compose("train", ["budget=0.001"])).train.iterations == 70
        assert validate(compose("train", ["budget=1e-9"])).train.iterations == 1
        for bad in ("budget=0", "budget=1.5"):
            with pytest.raises(ConfigError, match="budget: must be > 0 and <= 1"):
                validate(compose("train", [bad]))


def test_reproduce_dry_run_lists_the_cells_and_their_cost(tmp_path):
    # dry runs train nothing: by mamlrun's entry point in this process
    code, out, _ = in_process("reproduce", "sinusoid", "--dry-run", "budget=0.001", cwd=tmp_path)
    assert code == 0
    for text in ("sinusoid_maml", "sinusoid_pretrained", "1/10", "0/10", "0.01", "budget 0.001"):
        assert text in out, text
    assert "cost: 3,500 training tasks" in out  # 2 cells x 70 iterations x 25 tasks
    assert not (tmp_path / "outputs").exists(), "a dry run must not run anything"
    assert "runs each cell once" in refused("reproduce", "sinusoid", "seed=1,2", cwd=tmp_path)
    no_table = refused("reproduce", "--dry-run", cwd=tmp_path)
    assert "name a table: omniglot, miniimagenet, sinusoid, all" in no_table


def test_reproduce_all_dry_run_plans_every_cell_of_the_paper(tmp_path):
    code, out, _ = in_process("reproduce", "all", "--dry-run", cwd=tmp_path)
    assert code == 0
    presets = resources.files("mamlrun.conf") / "experiment" / "finn2017"
    cells = sorted(p.name.removesuffix(".yaml") for p in presets.iterdir() if p.suffix == ".yaml")
    assert len(cells) == 12
    for cell in cells:
        assert cell in out, cell
    assert not (tmp_path / "outputs").exists()


def test_reproduce_dry_run_on_cuda_estimates_from_the_gpu_bench(tmp_path):
    """Cells that train on CUDA are costed with the GPU throughputs; unmeasured cells say "?"."""
    args = ("reproduce", "omniglot", "--dry-run", "hardware=cuda", "budget=0.1")
    code, out, _ = in_process(*args, cwd=tmp_path)
    assert code == 0 and "est. H200 time" in out and "on an H200 GPU" in out
    rows = {line.split()[1]: line for line in out.splitlines() if "omniglot_" in line}
    tasks = 6_000 * 32  # budget 0.1 of 60,000 iterations, meta-batch 32
    expected = _duration(tasks / device_throughput("cuda")[1]["omniglot_5w1s"])
    assert rows["omniglot_5w1s"].split("│")[-2].strip() == expected
    assert rows["omniglot_5w5s"].split("│")[-2].strip() == "?"  # not benchmarked on a GPU
    assert "not counting the 4 cell(s) marked ?" in " ".join(out.split())  # 5w5s, 20w5s, MLPs


def test_reproduce_sinusoid_writes_the_comparison_and_reuses_finished_cells(tmp_path):
    result = run_mamlrun("reproduce", "sinusoid", *TINY, cwd=tmp_path)
    table = tmp_path / "outputs/reproduce/sinusoid"
    cells = {name: table / "finn2017" / name for name in ("sinusoid_maml", "sinusoid_pretrained")}
    for cell in cells.values():
        assert (cell / "eval.json").is_file() and (cell / "sinusoid_fits.png").is_file()
    maml, pretrained = (json.loads((c / "eval.json").read_text()) for c in cells.values())
    assert (maml["algorithm"], pretrained["algorithm"]) == ("maml", "pretrain")
    for key in ("inner_lr", "inner_steps", "tasks", "eval_seed"):
        assert maml[key] == pretrained[key], key  # evaluated the same way
    assert (table / "sinusoid_k5_steps.png").stat().st_size > 0

    rows = list(csv.DictReader((table / "comparison.csv").open()))
    paper = {(r["preset"], r["setting"], r["steps"]): r["paper_value"] for r in rows}
    assert paper[("finn2017/sinusoid_maml", "K=5", "1")] == "0.67"
    assert paper[("finn2017/sinusoid_pretrained", "K=5", "10")] == "2.19"
    assert paper[("finn2017/sinusoid_pretrained", "K=20", "10")] == ""  # the paper has no K=20
    assert len(rows) == 2 * 3 * 3 and all(r["mamlrun_mean"] for r in rows)
    markdown = (table / "comparison.md").read_text()
    for text in ("budget 0.0002", "SCALED", "hardware:", "| sinusoid_pretrained | K=5 |"):
        assert text in markdown, text
    assert "paper vs mamlrun" in result.stdout

    stamps = {name: (cell / "eval.json").stat().st_mtime_ns for name, cell in cells.items()}
    again = run_mamlrun("reproduce", "sinusoid", *TINY, cwd=tmp_path)
    assert "reused 2 finished cell(s)" in again.stdout
    assert "Hydra multirun" not in again.stdout and "meta-train" not in again.stdout
    assert {n: (c / "eval.json").stat().st_mtime_ns for n, c in cells.items()} == stamps


def _interrupted_run(run_dir, cwd):
    """A real interruption: Ctrl-C once the first checkpoint is written."""
    process = subprocess.Popen(
        [*MAMLRUN, "train", *QUICK, "train.iterations=100000", f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A shell that starts jobs in the background (CI may) makes them ignore SIGINT, and the
        # child would inherit that: give it the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints/last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the atomic rename of the checkpoint settle
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)


def test_report_lists_failed_and_unfinished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    run_mamlrun(
        "train", *QUICK, "train.iterations=10", f"hydra.run.dir={sweep / 'ok'}", cwd=tmp_path
    )
    # A job that raised: its data is missing, so it stops after Hydra made its directory.
    no_data = (f"dataset.root={tmp_path / 'no-data'}", f"hydra.run.dir={sweep / 'broken'}")
    refused("train", *QUICK, "dataset=omniglot", *no_data, cwd=tmp_path)
    assert (sweep / "broken/.hydra").is_dir()
    # refused by validation: its recorded config holds values of the wrong type
    wrong = ("train.iterations=abc", "budget=abc", f"hydra.run.dir={sweep / 'refused'}")
    refused("train", *QUICK, *wrong, cwd=tmp_path)
    _interrupted_run(sweep / "stopped", tmp_path)

    code, stdout, _ = in_process(
        "report", str(sweep), "--out", str(tmp_path / "report"), cwd=tmp_path
    )
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "report/results.csv").open()))
    status = {r["run"]: r["status"] for r in rows}
    expected = {"ok": "finished", "broken": "failed", "refused": "failed", "stopped": "unfinished"}
    assert status == expected, rows
    ok = next(r for r in rows if r["run"] == "ok")
    assert "±" in ok["test K=5 mse"] and ok["dataset"] == "–"  # `dataset` was swept
    assert "runs: 1 of 4 finished" in stdout
    assert (tmp_path / "report/results.md").is_file()
    # an --out that cannot be written: the tables are still printed, then one line, exit 2
    (tmp_path / "a-file").write_text("")
    code, stdout, stderr = in_process(
        "report", str(sweep), "--out", str(tmp_path / "a-file/report"), cwd=tmp_path
    )
    assert code == 2 and "runs: 1 of 4 finished" in stdout
    assert "a-file/report: cannot write there (Not a directory)" in stderr
