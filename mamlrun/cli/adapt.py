"""`mamlrun adapt checkpoint=<run dir or .pt> support=<dir or csv> [query=<dir, file or csv>]
[adapt.steps=N] [adapt.out=<dir>] [adapt.device=cpu] [adapt.convert=true]
[trust_model_target=true]`.

Arguments only: `key=value` pairs checked and handed to `mamlrun.run.adapt`.
"""

from __future__ import annotations

from pathlib import Path

from mamlrun.errors import UserError

USAGE = " ".join(__doc__.split("\n\n")[0].split()).strip("`.").replace("`", "")
KEYS = (
    "checkpoint",
    "support",
    "query",
    "adapt.steps",
    "adapt.out",
    "adapt.device",
    "adapt.convert",
    "trust_model_target",
)
BOOLEANS = {"true": True, "false": False}


def parse(args: list[str]):
    """The command line as `AdaptOptions`.

    Raises:
        UserError: an argument that is not key=value, an unknown or repeated key, a missing
            checkpoint= or support=, or a value of the wrong type.
    """
    from mamlrun.run.adapt import AdaptOptions

    values: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not value:
            raise UserError(f"{arg}: expected key=value; usage: {USAGE}")
        if key not in KEYS:
            raise UserError(f"{key}: unknown key (choose from {', '.join(KEYS)})")
        if key in values:
            raise UserError(f"{key}: given twice")
        values[key] = value
    for key in ("checkpoint", "support"):
        if key not in values:
            raise UserError(f"give {key}=...; usage: {USAGE}")
    steps = values.get("adapt.steps")
    if steps is not None and not steps.isdigit():
        raise UserError(f"adapt.steps={steps}: give a whole number of steps >= 0")
    flags = {}
    for key in ("adapt.convert", "trust_model_target"):
        text = values.get(key, "false")
        if text.lower() not in BOOLEANS:
            raise UserError(f"{key}={text}: give true or false")
        flags[key] = BOOLEANS[text.lower()]
    return AdaptOptions(
        checkpoint=values["checkpoint"],
        support=Path(values["support"]).expanduser(),
        query=Path(values["query"]).expanduser() if "query" in values else None,
        steps=int(steps) if steps is not None else None,
        out=Path(values["adapt.out"]).expanduser() if "adapt.out" in values else None,
        device=values.get("adapt.device", "cpu"),
        convert=flags["adapt.convert"],
        trust_model_target=flags["trust_model_target"],
    )


def run_adapt(args: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in args):
        print(f"usage: {USAGE}\n\nREADME: Use it on your own images.")
        return 0
    from mamlrun.run import adapt

    adapt.run_adapt(parse(args))
    return 0
