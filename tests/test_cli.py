"""The console script as users meet it: help, Hydra flags, and errors that are one readable line."""

import os
from pathlib import Path

import pytest

from conftest import QUICK, refused, run_mamlrun


def test_help_lists_subcommands(tmp_path):
    out = run_mamlrun("--help", cwd=tmp_path).stdout
    assert "train" in out and "eval" in out and "examples:" in out


def test_unknown_subcommand_exits_2(tmp_path):
    result = run_mamlrun("trian", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2
    assert "unknown subcommand 'trian'" in result.stderr and "Traceback" not in result.stderr


def test_hydra_flags_work_after_the_subcommand(tmp_path):
    job = run_mamlrun("train", "--cfg", "job", "algorithm=fomaml", cwd=tmp_path).stdout
    assert "first_order: true" in job and "inner_lr: 0.01" in job
    help_text = run_mamlrun("train", "--help", cwd=tmp_path).stdout
    assert "mamlrun train" in help_text and "Configuration groups" in help_text
    assert "pkg://mamlrun.conf" in run_mamlrun("train", "--info", cwd=tmp_path).stdout
    assert not (tmp_path / "outputs").exists(), "--cfg/--help/--info must not start a run"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "dataset=omniglott"], "dataset/omniglott"),
        (["train", "sed=3"], "Could not override 'sed' (no such key"),
        (["train", "algorithm=reptile"], "algorithm/reptile' (choose from fomaml, maml, pretrain)"),
        (["train", "algorithm.inner_lr=-1"], "algorithm.inner_lr: must be >= 0"),
        (["train", "hardware=cuda"], "CUDA is not available"),
        (["eval", "checkpoint=does/not/exist"], "does/not/exist: no such checkpoint"),
        (["eval"], "checkpoint: required"),
        (["eval", "eval.taskz=5"], "Could not override 'eval.taskz'"),
        (["eval", "checkpoint=x.pt", "data_root=[1]"], "data_root: expected"),
        (["train", "-m", "--cfg", "job"], "Only one of --run, --multirun, --cfg"),
        (["train", "resume=nowhere"], "nowhere: no such checkpoint"),
        (["train", "resume=."], ": no checkpoints/last.pt in this directory; pass a run"),
        (["eval", "checkpoint=."], ": no checkpoints/best.pt or checkpoints/last.pt in this"),
        (
            ["train", "+algorithm.meta_optimizer.betas=x"],
            "algorithm.meta_optimizer: torch.optim.Adam refused {'betas': 'x'}",
        ),
        (
            ["train", "+model._target_=torch.nn.Nope"],
            "model._target_: cannot build torch.nn.Nope: ImportError",
        ),
        (["train", "hydra.run.dir=/proc/mamlrun-run"], "/proc/mamlrun-run: No such file"),
        (
            ["train", "experiment=finn2017/omniglot_5w1"],
            "omniglot_5w1: no such experiment preset (choose from finn2017/miniimagenet_5w1s",
        ),
        (["train", "-m", "experiment=glob(finn2017/omni)"], "matches no experiment preset"),
    ],
)
def test_bad_input_exits_nonzero_with_a_readable_message(tmp_path, args, needle):
    """By the console script's entry point in this process (the script itself: above)."""
    quick = QUICK if args[0] == "train" else ["logger=none", "eval.tasks=10"]
    line = refused(*args, *quick, cwd=tmp_path)
    assert needle in line, line
    assert not list(tmp_path.glob("outputs/*/*/checkpoints")), "no work may start on bad input"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["report"], "the following arguments are required: paths; see mamlrun report --help"),
        (["reproduce", "sinusoids"], "argument table: invalid choice: 'sinusoids'"),
        (["checkpoint", "convrt", "x.pt"], "invalid choice: 'convrt'"),
        (["checkpoint"], "the following arguments are required: action"),
    ],
)
def test_the_argparse_subcommands_refuse_in_one_line_too(tmp_path, args, needle):
    """Not argparse's usage and then the error: the error, saying where the usage is."""
    line = refused(*args, cwd=tmp_path)
    assert line.startswith(f"mamlrun {args[0]}: error: ") and needle in line, line
    assert line.endswith("--help")


def test_an_experiment_glob_expands_to_the_presets_in_their_folder():
    """Hydra's glob sees only conf/experiment/ itself, where there are no presets: the README's
    `mamlrun train -m 'experiment=glob(finn2017/omniglot_*)'` launched 0 jobs."""
    from mamlrun.cli.hydra_app import _expand_experiment

    expanded = _expand_experiment("experiment=glob(finn2017/omniglot_*,exclude=*mlp*)")
    names = expanded.removeprefix("experiment=").split(",")
    assert names == [f"finn2017/omniglot_{cell}" for cell in ("20w1s", "20w5s", "5w1s", "5w5s")]
    assert _expand_experiment("experiment=finn2017/sinusoid_maml") == (
        "experiment=finn2017/sinusoid_maml"
    )


@pytest.mark.skipif(
    bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists(),
    reason="checks the message of a machine without W&B credentials",
)
def test_online_wandb_without_credentials_is_one_line(tmp_path):
    args = [a for a in QUICK if a != "logger=none"]
    result = run_mamlrun(
        "train", *args, "logger=wandb", "logger.mode=online", cwd=tmp_path, expect_ok=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mamlrun train: error: logger.mode=online: wandb could not")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _imported_packages(*args: str, cwd: Path, monkeypatch) -> set[str]:
    """Top-level packages a `mamlrun` command imports (Python's import-time report)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    lines = run_mamlrun(*args, cwd=cwd).stderr.splitlines()
    report = [line for line in lines if line.startswith("import time:")]
    messages = [line for line in lines if not line.startswith("import time:")]
    assert not any("gym" in line for line in messages), messages  # learn2learn's import notice
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report}


def test_only_the_learn2learn_engine_pays_for_importing_learn2learn(tmp_path, monkeypatch):
    """learn2learn's import (torchvision models, cvxpy, Lightning helpers: ~4.5 s on 2 cores)
    is deferred to the engine and sampler that use it, so a default run and every one-line error
    start without it."""
    run = ["train", *QUICK, "train.iterations=3", "train.eval_at_end=false"]
    assert "learn2learn" not in _imported_packages(*run, cwd=tmp_path, monkeypatch=monkeypatch)
    with_learn2learn = _imported_packages(
        *run, "algorithm.engine=learn2learn", cwd=tmp_path, monkeypatch=monkeypatch
    )
    assert "learn2learn" in with_learn2learn
