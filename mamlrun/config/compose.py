"""Composing configs outside a Hydra app, the shipped configs, and reading Hydra overrides.

`mamlrun data`, `mamlrun reproduce` and the tests compose the `train` (or `eval`) config exactly as
`mamlrun train` does; Hydra's multi-line complaints become the one line the CLI prints.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mamlrun.errors import UserError

# The checkout's configs, used when mamlrun runs from a source tree that is not installed.
SOURCE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def configs_installed() -> bool:
    """Whether the configs are installed as the `mamlrun.conf` package."""
    return importlib.util.find_spec("mamlrun.conf") is not None


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The `train` (or `eval`) config with `overrides`, composed as `mamlrun train` composes it,
    outside a Hydra app (`mamlrun data`, `mamlrun reproduce`, tests).

    Raises:
        UserError: Hydra's or OmegaConf's complaint (an unknown key, group option or value, an
            override that does not parse), in one line.
    """
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.errors import HydraException

    if configs_installed():
        context = initialize_config_module("mamlrun.conf", version_base="1.3")
    else:
        context = initialize_config_dir(str(SOURCE_CONF_DIR), version_base="1.3")
    try:
        with context:
            return compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(error_line(err)) from None


def error_line(err: Exception) -> str:
    """An exception's multi-line message as one line that still says what is wrong: its first
    line (with the next where the first ends in ":"), and for Hydra's complaint about an unknown
    group option the group's choices."""
    text = str(err).strip()
    hint = ""
    if "Available options" in text:  # an unknown group option: Hydra lists the group's
        listing = text.split("Available options", 1)[1].split("Config search path")[0]
        hint = f" (choose from {', '.join(listing.split()[2:])})"  # after "in 'group':"
    elif text.startswith("Could not override"):
        hint = " (no such key; `mamlrun train --cfg job` or `mamlrun eval --cfg job` lists them)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:  # "Error in call to target 'x':" + the cause
        first = f"{first} {lines[1]}"
    return first.rstrip(".") + hint


def _shipped_configs():
    """The folder of the shipped configs: the installed `mamlrun.conf`, or the checkout's."""
    return resources.files("mamlrun.conf") if configs_installed() else SOURCE_CONF_DIR


def experiment_presets() -> list[str]:
    """The experiment presets, named as `experiment=` takes them (`finn2017/omniglot_5w1s`).

    Hydra's own `glob()` and its list of choices see only a group's top folder, and the presets
    live one folder down (`conf/experiment/finn2017/`): `mamlrun train` expands and checks
    `experiment=` values against this list instead (`mamlrun.cli`)."""
    root = _shipped_configs() / "experiment"

    def walk(folder, prefix: str) -> list[str]:
        names = []
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                names += walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml"):
                names.append(prefix + entry.name.removesuffix(".yaml"))
        return names

    return sorted(walk(root, "")) if root.is_dir() else []


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """The resolved config as plain Python (for checkpoints, metrics and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass(frozen=True)
class Override:
    """One Hydra override string (`key=value`, `+key=value`, `~key`, a sweep `key=a,b`), read by
    Hydra's own parser: the one way mamlrun reads overrides, typed or recorded by Hydra."""

    text: str  # as typed, or as recorded in .hydra/overrides.yaml
    key: str  # without Hydra's `+`, `++` and `~` prefixes
    value_text: str | None  # the value as written (`a,b` for a sweep); None for `~key`
    parsed: Any  # Hydra's `Override`: its `.value()`, sweeps, globs

    @property
    def value(self) -> Any:
        """The value as Hydra types it (`print_config=false` gives False)."""
        return self.parsed.value()

    @property
    def is_sweep(self) -> bool:
        return self.parsed.is_sweep_override()

    @property
    def is_hydra(self) -> bool:
        """A setting of Hydra's own (`hydra.run.dir=...`), not part of a run's config."""
        return self.key.startswith("hydra")


def parse_overrides(texts: list[str]) -> list[Override]:
    """Hydra's reading of override strings.

    Raises:
        UserError: an override that does not parse, in one line (Hydra's own message).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(texts))
    except HydraException as err:
        raise UserError(error_line(err)) from None
    return [
        Override(
            text=o.input_line,
            key=o.get_key_element().lstrip("+~"),
            value_text=o.input_line.split("=", 1)[1] if "=" in o.input_line else None,
            parsed=o,
        )
        for o in parsed
    ]
