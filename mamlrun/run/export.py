"""An adapted model written so that it runs without mamlrun: its weights, a `torch.export`
program (TorchScript where export cannot trace the model), a JSON of what the inputs and outputs
mean, and a README with the lines that load and call it in plain PyTorch.

The program is loaded back and compared with the model it came from before the command ends, so
a program that does not compute what mamlrun printed is never handed over silently.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamlrun.data.atomic import write_atomically
from mamlrun.run import jsonio

WEIGHTS = "weights.pt"  # the adapted state_dict (tensors only)
PROGRAM = "model.pt2"  # torch.export.save
TORCHSCRIPT = "model.torchscript.pt"  # torch.jit.save, where torch.export fails
META = "adapted.json"
README = "README.md"


def _program(model: nn.Module, example: torch.Tensor) -> tuple[str, bytes]:
    """(file name, bytes) of the model as a torch.export program with any batch size, else as
    TorchScript traced on `example`."""
    buffer = io.BytesIO()
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
        return PROGRAM, buffer.getvalue()
    except Exception:  # noqa: BLE001 - export refuses many constructs; TorchScript may not
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, buffer)
        return TORCHSCRIPT, buffer.getvalue()


def load_program(path: Path) -> Any:
    """The callable saved at `path` (either format), as the README shows."""
    if path.name == PROGRAM:
        return torch.export.load(path).module()
    return torch.jit.load(path)


def export_model(
    model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write WEIGHTS, the program, META (`meta` plus the file names) and README into `out`.

    Returns:
        META's content. Raises RuntimeError if the saved program's outputs on `example` differ
        from the model's.
    """
    model = model.cpu().eval()
    example = example.cpu()
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    name, program = _program(model, example)
    meta = {**meta, "program": name, "weights": WEIGHTS}
    for file, data in (
        (WEIGHTS, weights.getvalue()),
        (name, program),
        (META, (jsonio.dumps(meta, indent=2) + "\n").encode()),
        (README, readme(meta).encode()),
    ):
        write_atomically(out / file, lambda handle, data=data: handle.write(data))
    with torch.no_grad():
        expected, saved = model(example), load_program(out / name)(example)
    if not torch.allclose(saved, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{out / name}: the saved program does not compute the adapted model")
    return meta


def readme(meta: dict[str, Any]) -> str:
    """How to use the exported model in plain PyTorch (no mamlrun), for its task type."""
    load = (
        "model = torch.export.load(f'{out}/model.pt2').module()"
        if meta["program"] == PROGRAM
        else "model = torch.jit.load(f'{out}/model.torchscript.pt')"
    )
    head = f"# An adapted model written by `mamlrun adapt`\n\nFrom {meta['checkpoint']}, adapted "
    head += f"with {meta['steps']} steps of size {meta['inner_lr']} on {meta['support']}.\n\n"
    if meta["task_type"] == "regression":
        body = f"""\
            ```python
            import torch

            out = "."  # this folder
            {load}
            x = torch.linspace(-5, 5, 100).view(-1, 1)  # inputs [N, {meta["input_shape"][0]}]
            y = model(x)  # predictions [N, 1]
            ```
            """
        return head + textwrap.dedent(body)
    prep = meta["preprocessing"]
    mode, size = ("L" if prep["channels"] == 1 else "RGB"), prep["size"]
    invert = "\n            pixels = 255 - pixels" if prep["invert"] else ""
    body = f"""\
        ```python
        import json

        import numpy as np
        import torch
        from PIL import Image

        out = "."  # this folder
        {load}
        classes = json.load(open(f"{{out}}/adapted.json"))["classes"]

        def prepare(path):  # what mamlrun did to every training image
            image = Image.open(path).convert("{mode}").resize(({size}, {size}), Image.LANCZOS)
            pixels = np.asarray(image, dtype=np.float32).reshape({size}, {size}, -1){invert}
            return torch.from_numpy(pixels / 255).permute(2, 0, 1)

        paths = ["a.png", "b.png"]
        logits = model(torch.stack([prepare(p) for p in paths]))[:, : len(classes)]
        probabilities = logits.softmax(dim=1)
        print([classes[i] for i in probabilities.argmax(dim=1)])
        ```

        The network normalizes with the statistics of the batch it is given (batch norm without
        running averages, as MAML's): give it the images of a task together, as mamlrun did, and
        not one at a time. Its outputs beyond the first {len(meta["classes"])} are the unused labels
        of a {meta["ways"]}-way model.
        """
    return head + textwrap.dedent(body)
