"""`mamlrun tune search=<name> [tune.trials=N] [tune.workers=K] [tune.storage=URL]
[tune.study=NAME] [hydra/launcher=slurm hydra.launcher.*=...] [train overrides...]`.

Arguments only: the command line is split into the tuner's own keys and the train overrides
every trial gets; the search file and the overrides are checked before any trial starts.
"""

from __future__ import annotations

from mamlrun.errors import UserError

USAGE = " ".join(__doc__.split("\n\n")[0].split()).strip("`.").replace("`", "")
TUNE_KEYS = {"trials", "workers", "storage", "study"}


def split_arguments(args: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(search= and tune.* values, launcher overrides, train overrides).

    Raises:
        UserError: an unknown tune key, a sweep, a run directory or a missing search=.
    """
    from mamlrun.config.compose import parse_overrides

    own: dict[str, str] = {}
    launcher: list[str] = []
    train: list[str] = []
    for override in parse_overrides(args):
        key, text = override.key, override.text
        if key == "search" or key.startswith("tune."):
            name = key.removeprefix("tune.")
            if key != "search" and name not in TUNE_KEYS:
                raise UserError(f"{text}: unknown key (tune.{', tune.'.join(sorted(TUNE_KEYS))})")
            own[key] = str(override.value_text)
        elif key == "hydra/launcher" or key.startswith("hydra.launcher."):
            launcher.append(text)
        elif override.is_sweep:
            raise UserError(f"{text}: a sweep; tune searches through search=<file>'s params")
        elif key.startswith("hydra.run") or key.startswith("hydra.sweep"):
            raise UserError(f"{text}: each trial has its own outputs/tune/<study>/trials/<n>/")
        else:
            train.append(text)
    if "search" not in own:
        raise UserError(f"give search=<name> (conf/search/); usage: {USAGE}")
    return own, launcher, train


def _positive(own: dict[str, str], key: str, default: int) -> int:
    text = own.get(key, str(default))
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{key}={text}: give a positive integer")
    return int(text)


def run_tune(args: list[str]) -> int:
    """Check everything, run the study to its trial count, then print and write its results."""
    if any(arg in ("-h", "--help") for arg in args):
        print(f"usage: {USAGE}\nSearch files: conf/search/. README: Hyperparameter search.")
        return 0
    from mamlrun.analysis import search, tune, tune_report

    own, launcher, train = split_arguments(args)
    space = search.read_search(own["search"])
    search.check_against_train(space, train)
    options = tune.TuneOptions(
        trials=_positive(own, "tune.trials", space.trials),
        workers=_positive(own, "tune.workers", 1),
        storage=own.get("tune.storage"),
        study=own.get("tune.study", space.name),
        launcher=launcher,
    )
    if "/" in str(options.study) or not options.study:
        raise UserError(f"tune.study={options.study}: a name, not a path")
    study = tune.run_tune(space, options, train)
    record = tune_report.read_record(options.study_dir())
    tune_report.write_results(study, options.study_dir(), record)
    return 0
