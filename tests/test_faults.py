"""The fault suite: training killed with SIGKILL (while it starts, trains, writes a checkpoint and
evaluates) and resumed, hostile input files, a full and a read-only disk, two processes on one
run directory.

Every fault must end the same way for the user: nothing finished is lost, and `resume=` (or simply
running the command again) continues to exactly the result of an undisturbed run. Each test prints
its figures (kills delivered, outcome per hostile file) so that `pytest -s` shows them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MAMLRUN, QUICK, read_jsonl, run_mamlrun

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file() and os.environ.get("CI") != "true",
    reason=f"the real Omniglot archives are not in {OMNIGLOT}",
)

# Checkpoints and logs often, so that kills land during checkpoint writes, logging, validation
# and the final evaluation as well as between them.
SINUSOID = [
    *QUICK,
    "train.iterations=400",
    "train.log_every=20",
    "train.val_every=100",
    "train.checkpoint_every=20",
    "eval.tasks=50",
]
OMNIGLOT_RUN = [
    *QUICK,
    "dataset=omniglot",
    f"dataset.root={OMNIGLOT}",
    "dataset.sampler=tensor",
    "hardware.compile=false",
    "algorithm.meta_batch_size=4",
    "train.iterations=40",
    "train.log_every=5",
    "train.val_every=20",
    "train.val_tasks=10",
    "train.checkpoint_every=5",
    "eval.tasks=20",
]


def _start(args: list[str], cwd: Path, stdout: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    with stdout.open("w") as out:
        return subprocess.Popen(
            [*MAMLRUN, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE
        )


def _results(run_dir: Path) -> tuple[dict, list, dict]:
    """Final weights, metrics.jsonl rows and eval.json (without its timing and path)."""
    weights = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    for key in ("seconds", "checkpoint"):
        evaluation.pop(key)
    return weights, read_jsonl(run_dir / "metrics.jsonl"), evaluation


PHASES: dict[str, int] = {}  # what the killed runs were doing, for the printed figures
# Kill moments, in turn: anywhere in the process's life, while it writes a checkpoint (or another
# file, through a temporary one), anywhere, and during the final evaluation.
MOMENTS = ("anywhere", "writing a file", "anywhere", "evaluating")


def _moment(process, run_dir: Path, out: Path, moment: str, wait: float) -> str | None:
    """Wait for `moment` of the process's life (at most `wait` seconds for "anywhere", else as
    long as it lives); returns what it was doing then, or None if it ended first."""
    deadline = time.perf_counter() + wait
    while process.poll() is None:
        if moment == "writing a file" and any(run_dir.rglob(".*.tmp")):
            return moment
        if moment == "evaluating" and "Training summary" in out.read_text():
            time.sleep(random.uniform(0.05, 0.5))  # into the test tasks' adaptation and plots
            text = out.read_text()
            return moment if "done:" not in text and process.poll() is None else None
        if moment == "anywhere" and time.perf_counter() > deadline:
            return "training" if (run_dir / "metrics.jsonl").is_file() else "starting"
        time.sleep(0.001)
    return None


def _kill_and_resume(args: list[str], cwd: Path, kills: int, seed: int) -> tuple[int, Path]:
    """Run `mamlrun train ARGS` into a fresh directory, SIGKILL it at a moment of its life
    (`MOMENTS`, in turn), start it again (`resume=` once it has a checkpoint, else from scratch),
    and so on until `kills` kills have landed; then let it finish. Returns the kills delivered."""
    reference = cwd / "reference"
    started = time.perf_counter()
    run_mamlrun("train", *args, f"hydra.run.dir={reference}", cwd=cwd)
    lifetime = time.perf_counter() - started
    run_dir, rng, delivered, attempt = cwd / "killed", random.Random(seed), 0, 0
    while True:
        has_checkpoint = (run_dir / "checkpoints/last.pt").is_file()
        command = ["train", f"resume={run_dir}"] if has_checkpoint else ["train", *args]
        if not has_checkpoint:
            command.append(f"hydra.run.dir={run_dir}")
        out = cwd / f"attempt{attempt}.out"
        process, attempt = _start(command, cwd, out), attempt + 1
        if delivered == kills:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr.decode()[-2000:]
            return delivered, reference
        moment = MOMENTS[delivered % len(MOMENTS)]
        phase = _moment(process, run_dir, out, moment, rng.uniform(0.2, 1.0) * lifetime)
        if phase is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            delivered += 1
            PHASES[phase] = PHASES.get(phase, 0) + 1
            continue
        # it finished before the kill: a finished run is not rerun; start the chain again
        process.wait()
        assert process.returncode == 0, process.stderr.read().decode()[-2000:]
        _compare(run_dir, reference)
        shutil.rmtree(run_dir)


def _compare(run_dir: Path, reference: Path) -> None:
    weights, metrics, evaluation = _results(run_dir)
    expected_weights, expected_metrics, expected_evaluation = _results(reference)
    assert metrics == expected_metrics
    assert evaluation == expected_evaluation
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    assert not leftovers, f"half-written files left behind: {leftovers}"


def test_sigkill_at_random_moments_then_resume_gives_the_undisturbed_run_sinusoid(tmp_path):
    PHASES.clear()
    delivered, reference = _kill_and_resume(SINUSOID, tmp_path, kills=4, seed=1)
    _compare(tmp_path / "killed", reference)
    print(f"sinusoid: {delivered} kills delivered, {delivered} survived; phases {PHASES}")


@needs_omniglot
def test_sigkill_at_random_moments_then_resume_gives_the_undisturbed_run_omniglot(tmp_path):
    PHASES.clear()
    delivered, reference = _kill_and_resume(OMNIGLOT_RUN, tmp_path, kills=4, seed=2)
    _compare(tmp_path / "killed", reference)
    print(f"omniglot (tensor sampler): {delivered} kills, {delivered} survived; phases {PHASES}")


# ------------------------------------------------------------------------------ hostile files


def _mini_folder(root: Path, classes: int = 5, per_class: int = 3) -> Path:
    """A tiny miniImageNet in the raw-images layout: images/ and Ravi & Larochelle's csvs."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        rows = ["filename,label"]
        for c in range(classes):
            wnid = f"n{split}{c:02d}"
            for i in range(per_class):
                name = f"{wnid}{i:08d}.jpg"
                Image.new("RGB", (90, 90), (40 * c, 100, 30 * i)).save(root / "images" / name)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _refused(result, path: Path) -> str:
    """The command failed as bad input does: exit 2, one error line naming `path`."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    assert str(path) in errors[0], errors[0]
    return errors[0]


def _verify(dataset: str, root: Path, cwd: Path, **env: str):
    return run_mamlrun(
        "data", "verify", f"dataset={dataset}", f"dataset.root={root}", cwd=cwd, expect_ok=False
    )


def _no_partial_files(folder: Path) -> None:
    partial = [
        p for p in folder.rglob("*") if p.is_file() and (".tmp" in p.name or p.suffix == ".part")
    ]
    assert not partial, partial


def _hostile_omniglot(case: str, root: Path) -> Path:
    """Omniglot's two archives with one of them damaged as `case` says; returns the bad file."""
    root.mkdir()
    for name in ("images_background", "images_evaluation"):
        (root / f"{name}.zip").symlink_to(OMNIGLOT / f"{name}.zip")
    bad = root / "images_background.zip"
    data = (OMNIGLOT / "images_background.zip").read_bytes()
    bad.unlink()
    if case == "truncated zip":
        bad.write_bytes(data[: len(data) // 3])
    elif case == "not a zip":
        bad.write_bytes(b"<!DOCTYPE html><html>GitHub: rate limit exceeded</html>")
    else:  # a damaged member: bytes flipped in the middle of the archive
        middle = len(data) // 2
        bad.write_bytes(
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    return bad


@needs_omniglot
@pytest.mark.parametrize("case", ["truncated zip", "not a zip", "damaged member"])
def test_a_damaged_omniglot_archive_is_one_line_naming_it(case, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_CACHE", str(tmp_path / "cache"))
    bad = _hostile_omniglot(case, tmp_path / "omniglot")
    line = _refused(_verify("omniglot", tmp_path / "omniglot", tmp_path), bad)
    assert "delete it and download again" in line
    _no_partial_files(tmp_path)
    assert not list((tmp_path / "cache").glob("*.pt")) if (tmp_path / "cache").exists() else True
    print(f"hostile Omniglot ({case}): refused, {line}")


def test_hostile_miniimagenet_files_are_one_line_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_CACHE", str(tmp_path / "cache"))
    html = tmp_path / "html"
    html.mkdir()
    (html / "mini-imagenet-cache-train.pkl").write_text("<!DOCTYPE html><html>Google Drive</html>")
    line = _refused(_verify("miniimagenet", html, tmp_path), html / "mini-imagenet-cache-train.pkl")
    assert "an HTML page, not a pickle" in line
    print(f"hostile miniImageNet (HTML saved as the pickle): refused, {line}")

    folder = _mini_folder(tmp_path / "folder")
    bad = folder / "images" / "ntrain0100000001.jpg"
    bad.write_bytes(b"this is not a JPEG")
    line = _refused(_verify("miniimagenet", folder, tmp_path), bad)
    assert "cannot read the image" in line
    _no_partial_files(tmp_path)
    print(f"hostile miniImageNet (an image that is not one): refused, {line}")


def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_mamlrun(
        "train",
        *QUICK,
        "train.iterations=2",
        f"hydra.run.dir={blocker}/run",
        cwd=tmp_path,
        expect_ok=False,
    )
    line = _refused(result, blocker / "run")
    print(f"hostile output directory (a file in the path): refused, {line}")


def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_CACHE", str(tmp_path / "cache"))
    folder = _mini_folder(tmp_path / "folder")
    run_mamlrun("data", "verify", "dataset=miniimagenet", f"dataset.root={folder}", cwd=tmp_path)
    caches = sorted((tmp_path / "cache").glob("miniimagenet-*.pt"))
    assert len(caches) == 3
    whole = caches[0].read_bytes()
    caches[0].write_bytes(whole[: len(whole) // 2])  # a truncated cache file
    result = run_mamlrun(
        "data", "verify", "dataset=miniimagenet", f"dataset.root={folder}", cwd=tmp_path
    )
    notices = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(notices) == 1 and str(caches[0]) in notices[0] and "rebuilding" in notices[0]
    assert torch.load(caches[0], weights_only=True)["images"].shape[:2] == (5, 3)
    _no_partial_files(tmp_path)
    print(f"hostile cache (truncated): rebuilt, {notices[0]}")


def test_a_checkpoint_whose_weights_are_another_models_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_mamlrun(
        "train",
        *QUICK,
        "train.iterations=5",
        "train.eval_at_end=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    payload = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    payload["config"]["model"]["hidden"] = [64, 64]  # the weights are a 40-40 network's
    spliced = tmp_path / "spliced.pt"
    torch.save(payload, spliced)
    result = run_mamlrun(
        "eval", f"checkpoint={spliced}", "eval.tasks=5", cwd=tmp_path, expect_ok=False
    )
    line = _refused(result, spliced)
    assert "do not fit the model its config describes" in line
    print(f"hostile checkpoint (another model's weights): refused, {line}")


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
    """A process that died (or hit a full disk) while appending to metrics.jsonl leaves a partial
    last line; resume drops it and logs that point again, as an undisturbed run logged it."""
    short = [*QUICK, "train.eval_at_end=false", "train.checkpoint_every=10"]
    reference, cut = tmp_path / "reference", tmp_path / "cut"
    run_mamlrun("train", *short, "train.iterations=20", f"hydra.run.dir={reference}", cwd=tmp_path)
    run_mamlrun("train", *short, "train.iterations=10", f"hydra.run.dir={cut}", cwd=tmp_path)
    with (cut / "metrics.jsonl").open("a") as file:
        file.write('{"iteration": 15, "split": "tr')
    run_mamlrun("train", f"resume={cut}", "train.iterations=20", cwd=tmp_path)
    assert read_jsonl(cut / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


# --------------------------------------------------------------- a full disk, a read-only disk


def _in_private_mount(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a shell script in its own mount namespace (`unshare -m`, as root), so that the small
    or read-only tmpfs it mounts exists for it alone and disappears with it."""
    env = {**os.environ, "WANDB_SILENT": "true", "MAMLRUN": " ".join(MAMLRUN)}
    return subprocess.run(
        ["unshare", "-m", "sh", "-euc", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _can_mount(tmp_path: Path) -> bool:
    probe = _in_private_mount(f"mount -t tmpfs -o size=64k tmpfs {tmp_path}", tmp_path)
    return probe.returncode == 0


def test_a_full_disk_during_training_is_one_line_and_loses_nothing(tmp_path):
    if not _can_mount(tmp_path) and os.environ.get("CI") != "true":
        pytest.skip("needs root and `unshare -m` to mount a small tmpfs")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    args = " ".join([*QUICK, "train.eval_at_end=false", "train.checkpoint_every=10"])
    script = f"""
mount -t tmpfs -o size=4m tmpfs {disk}
$MAMLRUN train {args} train.iterations=10 hydra.run.dir={disk}/run > {out}/first.log 2>&1
cp {disk}/run/checkpoints/last.pt {out}/before.pt
dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null || true
set +e
$MAMLRUN train resume={disk}/run train.iterations=30 > {out}/full.out 2> {out}/full.err
echo $? > {out}/full.rc
set -e
cp {disk}/run/checkpoints/last.pt {out}/after.pt
ls -a {disk}/run/checkpoints > {out}/files.txt
rm {disk}/filler
$MAMLRUN train resume={disk}/run train.iterations=30 > {out}/again.log 2>&1
cp {disk}/run/checkpoints/last.pt {out}/final.pt
"""
    result = _in_private_mount(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int((out / "full.rc").read_text()) != 0
    errors = [line for line in (out / "full.err").read_text().splitlines() if "error:" in line]
    assert len(errors) == 1 and str(disk / "run") in errors[0], (out / "full.err").read_text()
    assert "No space left on device" in errors[0]
    assert (out / "before.pt").read_bytes() == (out / "after.pt").read_bytes()
    assert not [name for name in (out / "files.txt").read_text().split() if ".tmp" in name]
    assert torch.load(out / "final.pt", weights_only=True)["iteration"] == 30
    print(f"full disk during training: refused, {errors[0]}; checkpoint intact, resumed to 30")


def test_a_read_only_output_directory_is_one_line(tmp_path):
    if not _can_mount(tmp_path) and os.environ.get("CI") != "true":
        pytest.skip("needs root and `unshare -m` to mount a read-only tmpfs")
    disk = tmp_path / "ro"
    disk.mkdir()
    script = f"""
mount -t tmpfs -o ro,size=64k tmpfs {disk}
$MAMLRUN train {" ".join(QUICK)} train.iterations=2 hydra.run.dir={disk}/run
"""
    result = _in_private_mount(script, tmp_path)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert str(disk / "run") in errors[0] and "Read-only file system" in errors[0]
    print(f"hostile output directory (read-only file system): refused, {errors[0]}")


def test_reproduce_started_again_refuses_a_cell_that_is_still_training(tmp_path):
    """A second `mamlrun reproduce` would set a cell aside (or resume it) while the first one's
    `mamlrun train` still writes it: it refuses, naming the cell, and moves nothing."""
    from mamlrun.run import rundir

    cell = tmp_path / "outputs/reproduce/sinusoid/finn2017/sinusoid_maml"
    cell.mkdir(parents=True)
    (cell / "train.log").write_text("the first reproduce's job is writing here\n")
    with rundir.hold(cell):  # as that job's `mamlrun train` holds it
        result = run_mamlrun("reproduce", "sinusoid", "budget=0.001", cwd=tmp_path, expect_ok=False)
    line = _refused(result, cell)
    assert f"pid {os.getpid()}" in line and (cell / "train.log").is_file()
    assert not (tmp_path / "outputs/reproduce/sinusoid/.replaced").exists()
    print(f"two processes (reproduce started again): refused, {line}")
