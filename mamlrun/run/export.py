"""An adapted model written so that it runs without mamlrun: its weights, a `torch.export`
program (TorchScript where export cannot trace the model), a JSON of what the inputs and outputs
mean, `predict.py` (the lines that prepare inputs as training did, load the program and call it,
with torch, numpy and PIL only) and a README showing them.

The program is loaded back and compared with the model it came from before the command ends, so
a program that does not compute what mamlrun printed is never handed over silently.
"""

from __future__ import annotations

import io
import warnings
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
PREDICT = "predict.py"  # standalone: torch, numpy, PIL


def _program(model: nn.Module, example: torch.Tensor) -> tuple[str, bytes]:
    """(file name, bytes) of the model as a torch.export program with any batch size, else as
    TorchScript traced on `example` (with a one-line warning saying why)."""
    buffer = io.BytesIO()
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
        return PROGRAM, buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - export refuses many constructs; TorchScript may not
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    warnings.warn(
        f"torch.export cannot export the model ({reason}); saved as TorchScript traced on the "
        "inputs instead, where branches on values are fixed as they went for these inputs",
        stacklevel=3,
    )
    with warnings.catch_warnings():  # TorchScript's deprecation and tracer notices
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, buffer)
    return TORCHSCRIPT, buffer.getvalue()


def load_program(path: Path) -> Any:
    """The callable saved at `path` (either format), as the README shows."""
    if path.name == PROGRAM:
        return torch.export.load(path).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still loads
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
        (PREDICT, predict_script(meta).encode()),
    ):
        write_atomically(out / file, lambda handle, data=data: handle.write(data))
    with torch.no_grad():
        expected, saved = model(example), load_program(out / name)(example)
    if not torch.allclose(saved, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{out / name}: the saved program does not compute the adapted model")
    return meta


_IMAGES = '''\
"""Predict with the model `mamlrun adapt` wrote here, without mamlrun:
python predict.py image.png [image.jpg ...] prints path,class,probability per image."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
model = @LOAD@
classes = json.loads((HERE / "adapted.json").read_text())["classes"]


def prepare(path):
    """What mamlrun did to every training image."""
    image = Image.open(path)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # on white paper
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("@MODE@")
    if image.size != (@SIZE@, @SIZE@):
        image = image.resize((@SIZE@, @SIZE@), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32).reshape(@SIZE@, @SIZE@, -1)@INVERT@
    return torch.from_numpy(pixels / 255).permute(2, 0, 1)


def predict(paths):
    """Logits over the task's classes. Batch norm uses the statistics of this batch, as MAML's
    does: pass a task's images together, not one at a time."""
    with torch.no_grad():
        return model(torch.stack([prepare(path) for path in paths]))[:, : len(classes)]


if __name__ == "__main__":
    paths = sys.argv[1:]
    for path, p in zip(paths, predict(paths).softmax(dim=1)):
        print(f"{path},{classes[int(p.argmax())]},{float(p.max()):.4f}")
'''

_POINTS = '''\
"""Predict with the model `mamlrun adapt` wrote here, without mamlrun:
python predict.py 0.5 1.0 2.5 prints x,y per input."""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
model = @LOAD@


def predict(x):
    """Predictions [N, 1] for inputs x [N, 1]."""
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32).view(-1, 1))


if __name__ == "__main__":
    x = [float(value) for value in sys.argv[1:]]
    for value, y in zip(x, predict(x)[:, 0].tolist()):
        print(f"{value},{y}")
'''


def predict_script(meta: dict[str, Any]) -> str:
    """PREDICT: a standalone script (torch, numpy, PIL) that loads the program and predicts."""
    load = (
        'torch.export.load(HERE / "model.pt2").module()'
        if meta["program"] == PROGRAM
        else 'torch.jit.load(HERE / "model.torchscript.pt")'
    )
    if meta["task_type"] == "regression":
        return _POINTS.replace("@LOAD@", load)
    prep = meta["preprocessing"]
    invert = (
        "\n    pixels = 255 - pixels  # dark ink on white paper becomes high"
        if prep["invert"]
        else ""
    )
    script = _IMAGES.replace("@LOAD@", load).replace("@INVERT@", invert)
    script = script.replace("@MODE@", "L" if prep["channels"] == 1 else "RGB")
    return script.replace("@SIZE@", str(prep["size"]))


def readme(meta: dict[str, Any]) -> str:
    """How to use the exported model in plain PyTorch (no mamlrun)."""
    kind = "torch.export" if meta["program"] == PROGRAM else "TorchScript"
    example = "0.5 1.0 2.5" if meta["task_type"] == "regression" else "image.png other.jpg"
    lines = [
        "# An adapted model written by `mamlrun adapt`",
        "",
        f"{meta['checkpoint']} adapted with {meta['steps']} steps of size {meta['inner_lr']} "
        f"on {meta['support']}.",
        "",
        f"- `{meta['program']}`: the adapted network ({kind}), any batch size",
        f"- `{WEIGHTS}`: its state_dict; `{META}`: classes, preprocessing, steps",
        f"- `{PREDICT}`: loads it and predicts, with torch, numpy and PIL only:",
        "",
        "```bash",
        f"python predict.py {example}",
        "```",
        "",
        "or, in Python, the same lines:",
        "",
        "```python",
        predict_script(meta).rstrip(),
        "```",
        "",
    ]
    if meta["task_type"] != "regression":
        lines[-1:-1] = [
            "",
            "The network normalizes with the statistics of the batch it is given (batch norm "
            "without running averages, as MAML's): give it a task's images together, as mamlrun "
            f"did, not one at a time. Outputs beyond the first {len(meta['classes'])} are the "
            f"unused labels of a {meta['ways']}-way model.",
        ]
    return "\n".join(lines) + "\n"
