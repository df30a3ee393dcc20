"""`mamlrun bench [key=value ...]`: its options, checked in one line each; the work is in
`mamlrun.analysis.bench`."""

from __future__ import annotations

from pathlib import Path

from mamlrun.analysis import bench
from mamlrun.analysis.throughput import THROUGHPUT_ENV, THROUGHPUT_FILE, throughput_file
from mamlrun.config.schema import DEVICE_PATTERN
from mamlrun.errors import UserError

SHIPPED = "shipped"  # throughput=shipped: the file reproduce reads (THROUGHPUT_FILE)
DEFAULTS = {
    "settings": ",".join(bench.SETTING_PRESETS),
    "repeats": "5",
    "seconds": "3",
    "device": "cpu",
    "threads": "0",
    "output": "docs/benchmarks.md",
    "omniglot_root": "",
    "ablation": "false",
    "compile": "auto",
    "cuda_graphs": "auto",
    "precision": "auto",
    "throughput": SHIPPED,
}
KEY_NOTES = {
    "throughput": f"({THROUGHPUT_FILE.name} in mamlrun/analysis, or ${THROUGHPUT_ENV}; empty: none)"
}


def _check_number(key: str, value: str, kind: type, minimum: float) -> None:
    """A numeric option, refused in one line (naming it) where it does not parse or is too small."""
    try:
        ok = kind(value) >= minimum
    except ValueError:
        ok = False
    if not ok:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{key}={value}: expected {what} >= {minimum}")


def _check_choice(key: str, value: str, choices: tuple[str, ...], expected: str) -> None:
    if value not in choices:
        raise UserError(f"{key}={value}: expected {expected}")


def parse_options(args: list[str]) -> bench.BenchOptions:
    """key=value arguments (later ones win) as BenchOptions, each bad value refused in one line."""
    options = dict(DEFAULTS)
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise UserError(f"{arg}: expected key=value with key in {', '.join(options)}")
        options[key] = value
    for key, kind, minimum in (("repeats", int, 1), ("seconds", float, 0), ("threads", int, 0)):
        _check_number(key, options[key], kind, minimum)
    if not DEVICE_PATTERN.fullmatch(options["device"]):
        raise UserError(f"device={options['device']}: expected cpu, cuda or cuda:N")
    _check_choice("ablation", options["ablation"], ("true", "false"), "true or false")
    for key in ("compile", "cuda_graphs"):
        _check_choice(key, options[key], ("auto", "true", "false"), "auto, true or false")
    precisions = ("auto", *bench.PRECISION_LABELS)
    _check_choice("precision", options["precision"], precisions, "auto, fp32, tf32 or bf16")
    names = tuple(options["settings"].split(","))
    for name in names:
        if name not in bench.SETTING_PRESETS:
            choices = ", ".join(bench.SETTING_PRESETS)
            raise UserError(f"settings={name}: unknown (choose from {choices})")
    throughput = options["throughput"]
    if throughput:
        throughput = throughput_file() if throughput == SHIPPED else Path(throughput).expanduser()
    return bench.BenchOptions(
        settings=names,
        repeats=int(options["repeats"]),
        seconds=float(options["seconds"]),
        device=options["device"],
        threads=int(options["threads"]),
        output=options["output"],
        omniglot_root=options["omniglot_root"],
        ablation=options["ablation"] == "true",
        compile=options["compile"],
        cuda_graphs=options["cuda_graphs"],
        precision=options["precision"],
        throughput=throughput or None,
        command="mamlrun bench " + " ".join(f"{k}={v}" for k, v in options.items() if v),
    )


def usage() -> str:
    keys = "\n".join(
        f"  {key:<14} {value or '-'}" + (f"  {KEY_NOTES[key]}" if key in KEY_NOTES else "")
        for key, value in DEFAULTS.items()
    )
    return f"usage: mamlrun bench [key=value ...]\n\nkeys and defaults:\n{keys}\n\n{bench.__doc__}"


def run_bench(args: list[str]) -> None:
    """`mamlrun bench [settings=a,b] [repeats=5] [seconds=3] [device=cpu] [output=docs/...]`."""
    if any(arg in ("-h", "--help") for arg in args):
        print(usage())
        return
    bench.run_bench(parse_options(args))
