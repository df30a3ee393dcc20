"""Search spaces of `mamlrun tune`: `conf/search/<name>.yaml` (or a file path), read and checked.

A search file is data (`yaml.safe_load`, never code). Every parameter is a train key; before any
trial starts, each is composed into the train config at both ends of its range and validated as
`mamlrun train` validates, so a typo, an inverted or impossible range and a value the trainer
refuses are one line naming the file and key, not a study of failed trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamlrun.config.compose import SOURCE_CONF_DIR, compose_config, configs_installed
from mamlrun.config.validate import validate
from mamlrun.errors import UserError
from mamlrun.maml.objectives import TASK_TYPES
from mamlrun.run.build import task_type
from mamlrun.run.pruning import make_pruner

KINDS = ("float", "log_float", "int", "categorical")
SECTIONS = {"params", "objective", "budget", "trials", "sampler", "pruner"}


@dataclass(frozen=True)
class Param:
    """One searched train key: a range (`low`..`high`, on a log scale for log_float) or choices."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def ends(self) -> list[Any]:
        """The values that bound the range: each is composed and validated before a trial."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_float")


@dataclass
class SearchSpace:
    """A checked search file; `direction` and `metric` come from the composed train config."""

    name: str
    path: Path
    params: list[Param]
    budget: dict[str, Any]
    trials: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    metric: str = ""
    direction: str = "minimize"
    uses_wandb: bool = False

    def budget_overrides(self) -> list[str]:
        return [f"{key}={_override_value(value)}" for key, value in self.budget.items()]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def search_file(name: str) -> Path:
    """`search=<name>`: conf/search/<name>.yaml, or a path to a .yaml file."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
    elif configs_installed():
        from importlib import resources

        path = Path(str(resources.files("mamlrun.conf") / "search" / f"{name}.yaml"))
    else:
        path = SOURCE_CONF_DIR / "search" / f"{name}.yaml"
    if not path.is_file():
        folder = path.parent
        shipped = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        choose = f" (choose from {', '.join(shipped)})" if shipped else ""
        raise UserError(f"search={name}: no search file {path}{choose}")
    return path


def _number(value: Any, where: str) -> float:
    """A bound: YAML reads `1e-4` (no dot) as a string, so numeric strings are accepted."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}={value!r}: not a number; write e.g. 1.0e-4") from None


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"{path}: params.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise UserError(f"{where}: give {{type: one of {', '.join(KINDS)}, low:, high:}}")
    kind = spec["type"]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}.choices: give a non-empty list of values")
        return Param(key, kind, choices=tuple(choices))
    low, high = (_number(spec.get(end), f"{where}.{end}") for end in ("low", "high"))
    if low > high:
        raise UserError(f"{where}: low={low:g} > high={high:g}; swap them")
    if kind == "log_float" and low <= 0:
        raise UserError(
            f"{where}: a log range must be above 0 (low={low:g}); raise low or use float"
        )
    if kind == "int":
        if low != int(low) or high != int(high):
            raise UserError(f"{where}: an int range needs whole bounds ({low:g}, {high:g})")
        return Param(key, kind, int(low), int(high))
    return Param(key, kind, low, high)


def read_search(name: str) -> SearchSpace:
    """Read and check the structure of a search file (not yet against the train config)."""
    path = search_file(name)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict) or not spec["params"]:
        raise UserError(f"{path}: give params: {{<train key>: {{type:, low:, high:}}, ...}}")
    unknown = sorted(set(spec) - SECTIONS)
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    if spec.get("objective", "val") != "val":
        raise UserError(f"{path}: objective={spec['objective']!r}: only val is supported")
    budget = spec.get("budget") or {}
    trials = spec.get("trials", 20)
    if not isinstance(budget, dict) or not isinstance(trials, int) or trials < 1:
        raise UserError(f"{path}: budget is a mapping of train keys, trials a positive integer")
    sampler = dict(spec.get("sampler") or {"type": "tpe"})
    if sampler.get("type", "tpe") != "tpe":
        raise UserError(f"{path}: sampler.type={sampler.get('type')!r}: only tpe is supported")
    pruner = dict(spec.get("pruner") or {"type": "none"})
    try:
        make_pruner(pruner)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    params = [_param(path, str(key), value) for key, value in spec["params"].items()]
    return SearchSpace(path.stem, path, params, budget, trials, sampler, pruner)


def check_against_train(space: SearchSpace, train_overrides: list[str]) -> None:
    """Compose and validate the train config with the train overrides, the budget, and each
    parameter at each end of its range; sets the objective's metric and direction.

    Raises:
        UserError: naming the search file and key (or the override) that is refused.
    """
    base = [*space.budget_overrides(), *train_overrides]  # the command line wins
    try:
        cfg = compose_config(base)
        config = validate(cfg)
    except UserError as err:
        raise UserError(f"{space.path} (budget) with the train overrides: {err}") from None
    for param in space.params:
        for value in param.ends():
            override = f"{param.key}={_override_value(value)}"
            try:
                validate(compose_config([*base, override]))  # the searched value wins
            except UserError as err:
                raise UserError(f"{space.path}: params.{param.key} at {value!r}: {err}") from None
    _, metric, _, higher = TASK_TYPES[task_type(config.dataset)]
    steps = config.algorithm.test_inner_steps
    space.metric = f"val {metric} after {steps} inner steps"
    space.direction = "maximize" if higher else "minimize"
    space.uses_wandb = config.logger.name == "wandb"
