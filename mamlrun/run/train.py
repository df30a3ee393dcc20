"""`mamlrun train`: validate the config, build the run, fit, then evaluate the best checkpoint.

The loop itself is `mamlrun.run.trainer.Trainer`; this module decides what run it is (a new one,
or `resume=` of an interrupted one) and ends it cleanly whatever happens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mamlrun import console
from mamlrun.config.compose import parse_overrides, to_container
from mamlrun.config.validate import validate
from mamlrun.errors import ConfigError
from mamlrun.run import rundir
from mamlrun.run.build import refuse_untrusted_targets
from mamlrun.run.trainer import Trainer

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
    """
    config = validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_from = None
    if config.resume:
        resume_from = rundir.resolve(config.resume, prefer=rundir.LAST)
        run_dir = rundir.run_dir_of(resume_from)
    with rundir.hold(run_dir):
        rundir.remove_temporaries(run_dir)  # left by a run killed mid-write: never complete
        return _train(cfg, config, run_dir, resume_from)


def _train(cfg: DictConfig, config, run_dir: Path, resume_from: Path | None) -> float:
    payload = None
    if resume_from is not None:
        payload = rundir.load(resume_from)
        refuse_untrusted_targets(payload["config"], config.trust_model_target, resume_from)
        cfg = _resumed_config(cfg, payload["config"])
        config = validate(cfg)
    record = to_container(cfg)
    record.pop("hydra", None)
    trainer = Trainer(config, run_dir, record, payload)
    exit_code = 1
    try:
        trainer.fit()
        trainer.summarize()
        if config.train.eval_at_end:
            trainer.evaluate()
        exit_code = 0
        console.info(f"done: {run_dir}")
        return trainer.best["value"] if trainer.best else float("nan")
    except KeyboardInterrupt:
        console.info(f"interrupted; continue with: mamlrun train resume={run_dir}")
        raise
    finally:
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
