"""CUDA checks, run on a GPU machine (`pytest -m gpu`); skipped where there is no GPU."""

import copy

import pytest
import torch

from conftest import QUICK, read_jsonl, run_mamlrun
from mamlrun.engine import Learn2LearnEngine
from mamlrun.fewshot import TensorClassificationTasks
from mamlrun.meta_step import MetaStep, read_stats
from mamlrun.models import conv4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def exact_float32():
    """cuDNN convolutions default to TF32 on Ampere and newer, which rounds differently for the
    batched (vmap) and per-task convolutions; compare in true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(
    "options",
    [{"batching": "layers"}, {"batching": "layers", "compile_kernels": True}, {"batching": "vmap"}],
    ids=["layers", "layers_compiled", "vmap"],
)
def test_vmap_engine_matches_learn2learn_on_cuda(exact_float32, options):
    from mamlrun.vmap_engine import VmapEngine

    images = torch.randint(0, 256, (40, 20, 28, 28), dtype=torch.uint8)
    sampler = TensorClassificationTasks(images, range(40), 5, 1, 1, rotations=True, device="cuda")
    batch = sampler.sample(8)
    torch.manual_seed(0)
    model = conv4((1, 28, 28), 5).cuda()
    twin = copy.deepcopy(model)
    reference = Learn2LearnEngine(model, 0.4, task_type="classification").meta_backward(batch, 1)
    engine = VmapEngine(twin, 0.4, task_type="classification", **options)
    fast = engine.meta_backward(batch, 1)
    assert fast["loss_post"] == pytest.approx(reference["loss_post"], rel=1e-4)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("inner_steps", "bf16"), [(1, False), (3, False), (1, True)], ids=["1step", "3steps", "bf16"]
)
def test_cuda_graph_replays_the_eager_step(exact_float32, inner_steps, bf16):
    """Warm-up, capture, replays and eager logged steps in between: the captured run's
    statistics and parameters follow the eager run's (clipping, Adam and autocast included)."""
    from mamlrun.vmap_engine import VmapEngine

    images = torch.randint(0, 256, (40, 20, 28, 28), dtype=torch.uint8)
    sampler = TensorClassificationTasks(images, range(40), 5, 1, 1, rotations=True, device="cuda")
    torch.manual_seed(0)
    model = conv4((1, 28, 28), 5).cuda()
    steps = []
    for captured, twin in ((False, model), (True, copy.deepcopy(model))):
        engine = VmapEngine(twin, 0.4, task_type="classification")
        optimizer = torch.optim.Adam(twin.parameters(), lr=1e-3)
        steps.append(MetaStep(engine, optimizer, grad_clip=0.5, cuda_graph=captured, bf16=bf16))
    eager, graphed = steps
    tolerance = 1e-2 if bf16 else 1e-4
    for iteration in range(10):
        batch = sampler.sample(8)
        logged = iteration in (2, 6)  # before and after the capture
        expected = read_stats([eager(batch, inner_steps, logged)])[0]
        actual = read_stats([graphed(batch, inner_steps, logged)])[0]
        assert actual == pytest.approx(expected, rel=tolerance, abs=1e-6), iteration
    assert graphed._graph is not None
    for a, b in zip(model.parameters(), graphed.engine.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=1e-6)


def test_cuda_graph_run_learns_and_resumes_without_the_graph(tmp_path):
    run_dir = tmp_path / "graphed"
    common = ("train.iterations=500", "algorithm.meta_lr=0.01", *QUICK, "train.val_tasks=50")
    common += ("train.val_every=100", "train.checkpoint_every=100", f"hydra.run.dir={run_dir}")
    cuda = ("hardware=cuda", "hardware.cuda_graphs=true", "hardware.precision=tf32")
    run_mamlrun("train", *cuda, *common, cwd=tmp_path)
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"][-1]
    assert val["mse_step1"] < 0.7 * val["mse_step0"], val  # as tests/test_train_run.py
    # the capturable optimizer state continues in an eager run
    longer = ("train.iterations=520", "hardware.cuda_graphs=false")
    run_mamlrun("train", f"resume={run_dir}", *longer, cwd=tmp_path)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert max(r["iteration"] for r in rows) == 520
    args = ("train", f"resume={run_dir}", "hardware=cpu")
    on_cpu = run_mamlrun(*args, cwd=tmp_path, expect_ok=False)
    assert on_cpu.returncode == 2 and "drew its tasks on another device type" in on_cpu.stderr


def test_train_on_cuda_end_to_end(tmp_path):
    run_dir = tmp_path / "cuda_run"
    run_mamlrun(
        "train",
        "hardware=cuda",
        "algorithm.engine=vmap",
        "train.iterations=200",
        "algorithm.meta_lr=0.01",
        *QUICK,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"][-1]
    assert val["mse_step1"] < 0.8 * val["mse_step0"]
    assert (run_dir / "eval.json").is_file()
