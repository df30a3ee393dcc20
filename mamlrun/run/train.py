"""`mamlrun train`: validate the config, build the run, fit, then evaluate the best checkpoint.

The loop itself is `mamlrun.run.trainer.Trainer`; this module decides what run it is (a new one,
or `resume=` of an interrupted one) and ends it cleanly whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mamlrun import console
from mamlrun.config.compose import parse_overrides, to_container
from mamlrun.config.validate import validate
from mamlrun.data.atomic import write_atomically
from mamlrun.errors import ConfigError, UserError
from mamlrun.run import distributed, rundir
from mamlrun.run.build import check_image_files, refuse_untrusted_targets
from mamlrun.run.interrupt import Interrupted
from mamlrun.run.pruning import Pruned
from mamlrun.run.trainer import Trainer

AUTO = "auto"  # resume=auto: continue the run directory's own last.pt, if it holds one

# Keys a resumed run takes from the command line; everything else comes from the checkpoint.
RESUMABLE_SECTIONS = (
    "train",
    "eval",
    "hardware",
    "logger",
    "print_config",
    "resume",
    "task_name",
    "trust_model_target",
)


def run_train(cfg: DictConfig) -> float:
    """Train as configured; returns the best validation metric (for Hydra sweepers).

    The run directory is held (`rundir.hold`) from before the checkpoint is read until the run
    ends: a second `mamlrun train` into it is refused instead of interleaving its writes.

    Launched as several processes (torchrun, srun: `mamlrun.run.distributed`), rank 0 decides
    what run it is, holds the directory and writes its files; the other ranks take rank 0's run
    directory (Hydra's timestamp may differ by a second between ranks), its decision, or its
    error, then read the same checkpoint.
    """
    world = distributed.detect()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = validate(cfg)
        check_image_files(config.dataset)  # a folder dataset's classes and images, listed
        distributed.check_meta_batch(config.algorithm.meta_batch_size, world)
    except UserError:
        if not rundir.is_run_dir(run_dir) and world.is_main:  # a sweep's refused job: `mamlrun
            _save_hydra_files(cfg, run_dir)  # report` lists it
        raise
    resume_from = None  # the checkpoint `resume=<path>` names
    if config.resume and config.resume != AUTO:
        resume_from = rundir.resolve(config.resume, prefer=rundir.LAST)
        run_dir = rundir.run_dir_of(resume_from)
    distributed.setup(world, config.hardware.device)
    try:
        run_dir = _agreed_run_dir(world, run_dir)
        value = (_lead if world.is_main else _follow)(cfg, config, run_dir, resume_from, world)
    except BaseException:
        distributed.shutdown(world, clean=False)
        raise
    distributed.shutdown(world, clean=True)
    return value


def _lead(cfg: DictConfig, config, run_dir: Path, resume_from: Path | None, world) -> float:
    """Rank 0 (or the one process): hold the run directory, decide what run it is and tell the
    other ranks (its refusal, or to go on), then train."""
    decided = False
    try:
        with rundir.hold(run_dir):
            prepared = _prepare(cfg, config, run_dir, resume_from, writes=True)
            world.broadcast(None)  # no refusal: the other ranks read the same files
            decided = True
            if isinstance(prepared, float):
                return prepared
            return _train(*prepared, run_dir, world)
    except UserError as err:
        if world.distributed and not decided:
            world.broadcast(str(err))  # the other ranks wait for the decision
        raise


def _follow(cfg: DictConfig, config, run_dir: Path, resume_from: Path | None, world) -> float:
    """A rank other than 0: rank 0's refusal, else the same run, read from the same files.
    Its log lines stay out of the run directory's Hydra log (a SLURM task's, configured
    before this runs)."""
    for handler in logging.getLogger().handlers[:]:
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()
    refusal = world.broadcast(None)
    if refusal is not None:
        raise UserError(refusal)
    prepared = _prepare(cfg, config, run_dir, resume_from, writes=False)
    if isinstance(prepared, float):
        return prepared
    return _train(*prepared, run_dir, world)


def _agreed_run_dir(world, run_dir: Path) -> Path:
    """Rank 0's run directory on every rank; another rank's own (a later timestamp, made empty
    by Hydra) is removed."""
    agreed = world.broadcast(run_dir)
    if agreed != run_dir:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty
    return agreed


def _prepare(cfg: DictConfig, config, run_dir: Path, resume_from: Path | None, writes: bool):
    """The run to train, as (cfg, config, payload), or the best value of a finished run; with
    `writes` (rank 0, holding the directory) temporaries are removed and a new run's .hydra/
    written."""
    if writes:
        rundir.remove_temporaries(run_dir)  # left by a run killed mid-write: never complete
    if config.resume != AUTO:
        payload = rundir.load(resume_from) if resume_from is not None else None
        if payload is not None:
            refuse_untrusted_targets(payload["config"], config.trust_model_target, resume_from)
            cfg = _resumed_config(cfg, payload["config"])
            config = validate(cfg)
    else:
        payload = _auto_resume(cfg, run_dir, announce=writes)
        if payload is not None and _finished(payload, config, run_dir):
            if writes:
                console.info(f"already finished: {run_dir} (resume=null trains it again)")
            return (payload["best"] or {}).get("value", float("nan"))
    if payload is None and writes:
        _save_hydra_files(cfg, run_dir)
    return cfg, config, payload


def _save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """A new run's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml), as Hydra writes them.

    conf/train.yaml turns Hydra's own writing off (`hydra.output_subdir: null`): Hydra writes
    them before the task starts, over the files of the run a directory already holds, even when
    this run is then refused (the directory is in use, or holds another config's checkpoint).
    A continued run keeps its first command's files.
    """
    hydra = HydraConfig.get()
    files = {
        rundir.CONFIG: cfg,
        "hydra.yaml": OmegaConf.create({"hydra": OmegaConf.to_container(hydra)}),
        rundir.OVERRIDES: OmegaConf.create(list(hydra.overrides.task)),
    }
    for name, value in files.items():
        text = OmegaConf.to_yaml(value).encode()
        write_atomically(rundir.hydra_file(run_dir, name), lambda file, text=text: file.write(text))


def _auto_resume(cfg: DictConfig, run_dir: Path, announce: bool = True) -> dict[str, Any] | None:
    """`resume=auto`: the run's `last.pt` when the directory holds one, else None (a new run).

    Raises:
        ConfigError: the checkpoint is of another run (a setting outside the run control of
            `RESUMABLE_SECTIONS` differs); the directory is left as it is.
    """
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    if not last.is_file():
        return None
    payload = rundir.load(last)
    ours, theirs = _defining(to_container(cfg)), _defining(payload["config"])
    if ours != theirs:
        key = next(k for k in sorted({*ours, *theirs}) if ours.get(k) != theirs.get(k))
        raise ConfigError(
            f"{last}: a checkpoint of another run ({key}={theirs.get(key)!r} there, "
            f"{ours.get(key)!r} here); continue that run with resume={run_dir}, train this one "
            "in another hydra.run.dir, or overwrite it with resume=null"
        )
    if announce:
        console.info(f"resume=auto: {last} is of this run")
    return payload


def _defining(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The settings that make a run what it is, flattened: all but `RESUMABLE_SECTIONS`."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if not prefix and key in (*RESUMABLE_SECTIONS, "hydra"):
            continue
        if isinstance(value, dict):
            flat.update(_defining(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finished(payload: dict[str, Any], config, run_dir: Path) -> bool:
    """Trained to the end and evaluated (or evaluation is off): nothing is left to do."""
    trained = payload["iteration"] >= config.train.iterations
    return trained and (not config.train.eval_at_end or (run_dir / rundir.EVAL).is_file())


def _train(cfg: DictConfig, config, payload: dict[str, Any] | None, run_dir: Path, world) -> float:
    record = to_container(cfg)
    record.pop("hydra", None)
    device = distributed.device_for(config.hardware.device, world)
    config = dataclasses.replace(
        config, hardware=dataclasses.replace(config.hardware, device=device)
    )
    trainer = Trainer(config, run_dir, record, payload, world)
    if world.is_main:
        rundir.record_attempt(
            run_dir, trainer.start, threads=torch.get_num_threads(), world_size=world.size
        )
    exit_code = 1
    try:
        trainer.fit()
        trainer.summarize()
        if config.train.eval_at_end:
            trainer.evaluate()
        exit_code = 0
        if world.is_main:
            console.info(f"done: {run_dir}")
        return trainer.best["value"] if trainer.best else float("nan")
    except Pruned as pruned:  # a trial of `mamlrun tune` stopped by its pruner: a clean end
        if world.is_main:
            rundir.record_outcome(run_dir, "pruned", pruned.iteration)
        exit_code = 0
        console.info(f"{pruned}; {rundir.checkpoint_path(run_dir)} holds it")
        return trainer.best["value"] if trainer.best else float("nan")
    except Interrupted as stop:
        trainer.tracker.finish(stop.exit_code)
        exit_code = None  # finished above: the chained handler (submitit's requeue) may exit
        if stop.chains:  # it may end the process: the line is printed here, not at the top
            console.info(f"{stop}; then the handler the job had for it (submitit: requeue)")
            stop.chain()
        raise
    except KeyboardInterrupt:
        console.info(
            f"aborted; continue from the last checkpoint with: mamlrun train resume={run_dir}"
        )
        raise
    finally:
        if exit_code is not None:
            trainer.tracker.finish(exit_code)


def _resumed_config(cfg: DictConfig, checkpoint_config: dict[str, Any]) -> DictConfig:
    """The checkpoint's config, updated only by what this command line overrides explicitly.

    Run control (`train.*`, `eval.*`, `hardware`, `logger`, `print_config`) may change on resume,
    for example `train.iterations` to train longer.

    Raises:
        ConfigError: when the command line overrides what defines the run (dataset, model,
            algorithm, seed): that is a new run, not a continuation.
    """
    merged = OmegaConf.create(checkpoint_config)
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in parse_overrides(overrides):
        section = override.key.split(".", 1)[0]
        if override.is_hydra:
            continue
        if section not in RESUMABLE_SECTIONS:
            raise ConfigError(
                f"{override.text}: resume= continues a run with its own {section}; drop this "
                "override or start a new run"
            )
        OmegaConf.update(merged, override.key, OmegaConf.select(cfg, override.key), merge=False)
    merged["resume"] = cfg["resume"]
    # trusted by this command line, never by the file itself
    merged["trust_model_target"] = cfg.get("trust_model_target", False)
    return merged
