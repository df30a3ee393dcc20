"""`mamlrun data prepare|verify dataset=<name> [overrides]`: get a dataset ready without training.

`prepare` reads (and, with `dataset.download=true`, downloads) the files, checks their content and
writes the preprocessed tensor cache that training then loads in about a second. `verify` does the
same checks without downloading anything. Both print what was found per split.
"""

from __future__ import annotations

import dataclasses
import time

from mamlrun import console
from mamlrun.config.compose import compose_config
from mamlrun.config.schema import SinusoidDataset
from mamlrun.config.validate import validate
from mamlrun.errors import UserError
from mamlrun.run.build import check_image_files, load_image_splits

ACTIONS = ("prepare", "verify")


USAGE = f"usage: mamlrun data {{{','.join(ACTIONS)}}} dataset=<name> [key=value ...]"


def run_data(args: list[str]) -> None:
    if any(arg in ("-h", "--help") for arg in args):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return
    if not args:
        raise UserError(f"name an action; {USAGE}")
    if args[0] not in ACTIONS:
        raise UserError(f"unknown action {args[0]!r}; {USAGE}")
    action, overrides = args[0], args[1:]
    dataset = validate(compose_config(overrides)).dataset
    if isinstance(dataset, SinusoidDataset):
        console.info("sinusoid tasks are generated on the fly: nothing to prepare")
        return
    if action == "verify":
        dataset = dataclasses.replace(dataset, download=False)
    started = time.perf_counter()
    check_image_files(dataset)
    splits = load_image_splits(dataset)
    seconds = time.perf_counter() - started
    rows = []
    for split, (images, classes) in splits.items():
        shape = "x".join(str(s) for s in images.image_shape)
        counts = images.counts[classes]
        low, high = int(counts.min()), int(counts.max())
        rows.append([split, len(classes), str(low) if low == high else f"{low} to {high}", shape])
    console.print_table(
        f"{dataset.name} in {dataset.root} ({action}: ok, {seconds:.1f} s)",
        ["split", "classes", "images per class", "image shape"],
        rows,
    )
