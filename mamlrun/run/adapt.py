"""`mamlrun adapt`: a meta-trained initialization adapted to the user's own few-shot task.

Classification: `support/<class>/<images>` holds a few labelled examples of up to the model's
`ways` new classes; the images get the preprocessing the checkpoint records (so raw Omniglot
PNGs or camera JPEGs work as they are), the initialization takes the checkpoint's test-time
adaptation steps (`algorithm.test_inner_steps` of size `algorithm.inner_lr`, or `adapt.steps`),
and the adapted model predicts the `query` images (a file, a folder, or class folders, which adds
the accuracy and a confusion matrix). Regression: `support` is a CSV of x,y points and `query` a
CSV of x values (default: a grid over the training x range).

With fewer classes than the model's ways, the labels 0..m-1 are used and predictions are taken
over those m outputs only. The queries are predicted in one batch: the paper's networks normalize
with the statistics of the batch they see (no running averages), as in evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mamlrun import console
from mamlrun.config.schema import DEVICE_PATTERN, SinusoidDataset
from mamlrun.data.atomic import write_atomically
from mamlrun.data.folder import class_folders, class_images, image_suffixes
from mamlrun.data.preprocess import DECODE_ERRORS, Preprocessing, color_channels
from mamlrun.errors import UserError
from mamlrun.maml.adapt import adapt_model
from mamlrun.maml.objectives import TASK_TYPES
from mamlrun.run import rundir
from mamlrun.run.build import (
    input_shape,
    load_trained,
    model_for,
    preprocessing_for,
    task_type,
)
from mamlrun.run.export import export_model

PREDICTIONS = "predictions.csv"
CONFUSION = "confusion_matrix.png"
FIT = "fit.png"
SHOWN = 20  # query rows printed; all of them are in predictions.csv
GRID_POINTS = 200  # regression predictions without a query file


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """What `mamlrun adapt` was asked (cli/adapt.py parses the command line into it)."""

    checkpoint: str
    support: Path
    query: Path | None = None
    steps: int | None = None
    out: Path | None = None
    device: str = "cpu"
    convert: bool = False  # convert images of another channel count instead of refusing them
    trust_model_target: bool = False


def default_out() -> Path:
    return Path("outputs/adapt") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_adapt(options: AdaptOptions) -> dict[str, Any]:
    """Adapt, predict, write the outputs and the exported model; returns adapted.json's dict."""
    path, payload, config = load_trained(options.checkpoint, options.trust_model_target)
    if DEVICE_PATTERN.fullmatch(options.device) is None:
        raise UserError(f"adapt.device={options.device}: choose cpu, cuda or cuda:N")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"adapt.device={options.device}: no CUDA device here; use adapt.device=cpu")
    device = torch.device(options.device)
    out = options.out or default_out()
    if rundir.is_run_dir(out):
        raise UserError(f"adapt.out={out}: a training run's directory; give another folder")
    model = model_for(config.model, config.dataset)
    rundir.load_weights(model, payload, path)
    model = model.to(device).requires_grad_(False)
    algorithm = config.algorithm
    steps = algorithm.test_inner_steps if options.steps is None else options.steps
    if steps < 0:
        raise UserError(f"adapt.steps={steps}: must be >= 0")
    kind = task_type(config.dataset)
    meta = {
        "checkpoint": str(path),
        "iteration": payload["iteration"],
        "task_type": kind,
        "steps": steps,
        "inner_lr": algorithm.inner_lr,
        "support": str(options.support),
    }
    console.info(f"adapting {path} (iteration {payload['iteration']}) to {options.support} → {out}")
    if kind == "regression":
        return _adapt_regression(model, config.dataset, options, meta, out, device)
    prep = payload.get("preprocessing")  # older checkpoints: derived from their dataset config
    preprocessing = Preprocessing.from_dict(prep) if prep else preprocessing_for(config.dataset)
    return _adapt_classification(
        model, config.dataset.ways, preprocessing, options, meta, out, device
    )


# ----------------------------------------------------------------------------- classification


def _read_image(path: Path, preprocessing: Preprocessing, convert: bool) -> torch.Tensor:
    """One image as the model's training images were prepared, refusing another channel count
    (a color photo for a grayscale model, or the reverse) unless `convert`."""
    try:
        with Image.open(path) as image:
            image.load()
            channels = color_channels(image)
            if channels != preprocessing.channels and not convert:
                have = "a color image" if channels == 3 else "a grayscale image"
                want = (
                    "grayscale (1 channel)" if preprocessing.channels == 1 else "RGB (3 channels)"
                )
                raise UserError(
                    f"{path}: {have}, but the model was trained on {want} images; give such "
                    "images, or add adapt.convert=true to convert them"
                )
            return torch.from_numpy(preprocessing.apply(image))
    except DECODE_ERRORS as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None


def read_support(
    folder: Path, ways: int, preprocessing: Preprocessing, convert: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, int]]:
    """(images uint8 [n, C, H, W], labels [n], class names, images per class) of `folder`'s
    class folders, classes in name order."""
    if not folder.is_dir():
        raise UserError(f"support={folder}: not a folder; give a folder of class folders")
    classes = class_folders(folder)
    if not classes:
        raise UserError(
            f"support={folder}: no class folders; put each class's images in support/<class>/"
        )
    if len(classes) < 2:
        raise UserError(
            f"support={folder}: {len(classes)} class folder; a task needs at least two classes"
        )
    if len(classes) > ways:
        raise UserError(
            f"support={folder}: {len(classes)} classes, but the model was meta-trained on "
            f"{ways}-way tasks; give at most {ways} classes"
        )
    images, labels, counts = [], [], {}
    for label, class_folder in enumerate(classes):
        files = class_images(class_folder)
        if not files:
            raise UserError(f"{class_folder}: no images; add the class's labelled examples")
        images += [_read_image(file, preprocessing, convert) for file in files]
        labels += [label] * len(files)
        counts[class_folder.name] = len(files)
    return torch.stack(images), torch.tensor(labels), [c.name for c in classes], counts


def read_query(
    path: Path, names: list[str], preprocessing: Preprocessing, convert: bool
) -> tuple[torch.Tensor, torch.Tensor | None, list[Path]]:
    """(images, labels or None, files): one image file, a folder of images, or a folder of class
    folders named as support classes (labelled)."""
    if path.is_file():
        files, labels = [path], None
    elif path.is_dir():
        loose = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in image_suffixes()
        )
        folders = class_folders(path)
        if loose and folders:
            raise UserError(
                f"query={path}: holds both images and class folders; give one or the other"
            )
        if folders:
            unknown = [f.name for f in folders if f.name not in names]
            if unknown:
                raise UserError(
                    f"{path / unknown[0]}: not a class of the support set ({', '.join(names)})"
                )
            pairs = [(file, names.index(f.name)) for f in folders for file in class_images(f)]
            files, labels = [p for p, _ in pairs], torch.tensor([label for _, label in pairs])
        else:
            files, labels = loose, None
        if not files:
            raise UserError(f"query={path}: no images")
    else:
        raise UserError(f"query={path}: no such image file or folder")
    images = torch.stack([_read_image(file, preprocessing, convert) for file in files])
    return images, labels, files


def _adapt_classification(
    model: torch.nn.Module,
    ways: int,
    preprocessing: Preprocessing,
    options: AdaptOptions,
    meta: dict[str, Any],
    out: Path,
    device: torch.device,
) -> dict[str, Any]:
    support_x, support_y, names, counts = read_support(
        options.support, ways, preprocessing, options.convert
    )
    query = None
    if options.query is not None:
        query = read_query(options.query, names, preprocessing, options.convert)
    loss_fn = TASK_TYPES["classification"][0]
    adapted = adapt_model(
        model,
        loss_fn,
        meta["inner_lr"],
        support_x.to(device).float().div_(255),
        support_y.to(device),
        meta["steps"],
    )
    meta |= {
        "classes": names,
        "ways": ways,
        "support_images": counts,
        "preprocessing": preprocessing.to_dict(),
        "input_shape": list(support_x.shape[1:]),
        "normalization": "batch statistics of each call (as MAML's batch norm): pass a task's "
        "images together",
    }
    example = support_x.float().div(255)
    if query is not None:
        images, labels, files = query
        with torch.no_grad():
            logits = adapted(images.to(device).float().div_(255))[:, : len(names)].cpu()
        meta |= _report_predictions(logits, labels, files, names, options.query, out)
        example = images.float().div(255)
    exported = export_model(adapted, example, out, meta)
    console.info(f"adapted model: {out} (load it in plain PyTorch: {out / 'README.md'})")
    return exported


def _report_predictions(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    files: list[Path],
    names: list[str],
    root: Path,
    out: Path,
) -> dict[str, Any]:
    """Print and write predictions.csv (and, with labels, the accuracy and confusion matrix)."""
    probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    header = ["image", "predicted", "probability"]
    if labels is not None:
        header += ["class", "correct"]
    header += [f"p({name})" for name in names]
    rows = []
    for i, file in enumerate(files):
        row = [str(file), names[predicted[i]], f"{confidence[i]:.4f}"]
        if labels is not None:
            row += [names[labels[i]], str(bool(predicted[i] == labels[i])).lower()]
        rows.append(row + [f"{p:.4f}" for p in probabilities[i].tolist()])
    _write_csv(out / PREDICTIONS, header, rows)
    shown = [
        [_shown(files[i], root), *row[1 : len(header) - len(names)]]
        for i, row in enumerate(rows[:SHOWN])
    ]
    more = (
        f" (first {SHOWN} of {len(rows)}; all in {out / PREDICTIONS})" if len(rows) > SHOWN else ""
    )
    console.print_table(f"Predictions{more}", header[: len(header) - len(names)], shown)
    summary: dict[str, Any] = {"queries": len(files)}
    if labels is not None:
        from mamlrun.run import plots  # matplotlib once there is a plot to draw

        counts = torch.zeros(len(names), len(names), dtype=torch.long)
        counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        accuracy = float((predicted == labels).float().mean())
        plots.confusion_matrix(counts, names, out / CONFUSION)
        console.info(f"accuracy {accuracy:.2%} on {len(files)} labelled queries; {out / CONFUSION}")
        summary |= {"accuracy": accuracy, "confusion": counts.tolist()}
    return summary


def _shown(file: Path, root: Path) -> str:
    """A query image as the table shows it: relative to the query folder."""
    return str(file.relative_to(root)) if file.is_relative_to(root) else file.name


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    write_atomically(path, lambda file: file.write(data))


# --------------------------------------------------------------------------------- regression


def read_points(path: Path, columns: int, key: str) -> torch.Tensor:
    """float32 [rows, columns] from a CSV of numbers; a first row that is not numbers is a
    header and skipped."""
    if not path.is_file():
        raise UserError(f"{key}={path}: no such CSV file")
    try:
        rows = [row for row in csv.reader(path.read_text().splitlines()) if row]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{key}={path}: not a CSV file ({error})") from None
    if rows and not _numbers(rows[0]):
        rows = rows[1:]
    values = []
    for line, row in enumerate(rows, start=1):
        numbers = _numbers(row)
        if numbers is None or len(numbers) != columns:
            raise UserError(
                f"{key}={path}: row {line} is {','.join(row)!r}; expected {columns} number"
                f"{'s' * (columns > 1)} per row"
            )
        values.append(numbers)
    if not values:
        raise UserError(f"{key}={path}: no rows of numbers")
    return torch.tensor(values, dtype=torch.float32)


def _numbers(row: list[str]) -> list[float] | None:
    try:
        numbers = [float(cell) for cell in row]
    except ValueError:
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _adapt_regression(
    model: torch.nn.Module,
    dataset: Any,
    options: AdaptOptions,
    meta: dict[str, Any],
    out: Path,
    device: torch.device,
) -> dict[str, Any]:
    inputs = input_shape(dataset)[0]
    points = read_points(options.support, inputs + 1, "support")
    support_x, support_y = points[:, :inputs], points[:, inputs:]
    if options.query is not None:
        x = read_points(options.query, inputs, "query")
    else:
        low, high = dataset.x_range if isinstance(dataset, SinusoidDataset) else (-5.0, 5.0)
        x = torch.linspace(low, high, GRID_POINTS).view(-1, 1)
    loss_fn = TASK_TYPES["regression"][0]
    adapted = adapt_model(
        model, loss_fn, meta["inner_lr"], support_x.to(device), support_y.to(device), meta["steps"]
    )
    with torch.no_grad():
        before, after = (m(x.to(device)).cpu() for m in (model, adapted))
        support_mse = [
            float(loss_fn(m(support_x.to(device)).cpu(), support_y)) for m in (model, adapted)
        ]
    rows = [
        [f"{a:.6g}", f"{b:.6g}", f"{c:.6g}"]
        for a, b, c in zip(x[:, 0], before[:, 0], after[:, 0], strict=True)
    ]
    _write_csv(out / PREDICTIONS, ["x", "before", "after"], rows)
    from mamlrun.run import plots  # matplotlib once there is a plot to draw

    plots.adapted_fit(x, before, after, (support_x, support_y), meta["steps"], out / FIT)
    console.print_table(
        f"Adapted to {len(points)} support points",
        ["", "before", f"after {meta['steps']} steps"],
        [["support MSE", f"{support_mse[0]:.4f}", f"{support_mse[1]:.4f}"]],
    )
    meta |= {
        "input_shape": [inputs],
        "support_points": len(points),
        "support_mse": {"before": support_mse[0], "after": support_mse[1]},
        "queries": len(x),
    }
    exported = export_model(adapted, x, out, meta)
    console.info(f"predictions: {out / PREDICTIONS}, plot: {out / FIT}, model: {out}")
    return exported
