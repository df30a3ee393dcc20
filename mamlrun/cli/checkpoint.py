"""`mamlrun checkpoint convert <old.pt> [--out new.pt]`: an older checkpoint as data only.

Checkpoints written before mamlrun saved them as data only hold NumPy's RNG state pickled, so
`torch.load(weights_only=True)` refuses them. This command unpickles one such TRUSTED file and
writes it back in the data-only form (atomically), after which `eval` and `resume=` read it.
"""

from __future__ import annotations

from pathlib import Path

from mamlrun import console
from mamlrun.cli.parser import ArgumentParser
from mamlrun.run import rundir

DESCRIPTION = (
    "Rewrite a checkpoint written by an older mamlrun (NumPy's RNG state pickled) as data only, "
    "so that `mamlrun eval` and `mamlrun train resume=` accept it. WARNING: this UNPICKLES the "
    "file, which runs any code it contains: use it only on checkpoints you trust (ones you or a "
    "trusted colleague trained)."
)


def run_checkpoint(args: list[str]) -> Path:
    """`mamlrun checkpoint convert OLD [--out NEW]`: writes NEW (default: OLD, replaced)."""
    parser = ArgumentParser(prog="mamlrun checkpoint", description=DESCRIPTION)
    actions = parser.add_subparsers(dest="action", required=True)
    convert = actions.add_parser(
        "convert", help="rewrite a TRUSTED older checkpoint as data only", description=DESCRIPTION
    )
    convert.add_argument("checkpoint", type=Path, help="the older .pt file (trusted only)")
    convert.add_argument(
        "--out", type=Path, help="where to write the converted file (default: replace the input)"
    )
    options = parser.parse_args(args)
    source = rundir.resolve(options.checkpoint, prefer=rundir.LAST)
    out = options.out or source
    payload = rundir.convert_legacy(source, out)
    console.info(f"wrote {out} (data only, iteration {payload.get('iteration')})")
    return out
