"""What every command of the package checks before it loads anything (issue 22): arguments
range-checked as they are parsed, files it reads checked the way model folders are, output
places probed for writing, and results that must be finite. A bad one is one line,
`error: ...` naming the argument or the file, and exit 2; nothing is written.

    parser = Parser(prog=..., description=...)          # errors: one line, exit 2
    parser.add_argument("--steps", type=at_least(1))    # "argument --steps: must be >= 1, got -5"
    parser.add_argument("--guidance", type=finite(minimum=1.0))
    parser.add_argument("--resolution", type=multiple_of(8))
    args = parser.parse_args(argv)
    check_device(args.device); check_output_folder(args.out, "--out")

Pure Python and torch: no ray, no deepspeed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch


class Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line on stderr (`error: ...`) and exit 2, as
    the training driver's are; the usage is one `--help` away."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def finite(minimum: float | None = None):
    """An argparse type: a finite float (nan and inf refused), >= minimum when given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {value:g}")
        return value

    return parse


def multiple_of(step: int):
    """An argparse type: a positive multiple of `step` (image sizes: the VAE halves them three times)."""

    def parse(text: str) -> int:
        value = at_least(step)(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step}, got {value}")
        return value

    return parse


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (keyword arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {text!r}")
    return value


def check_device(device: str | None, flag: str = "--device") -> None:
    """ValueError unless torch can use `device` here (cuda without a GPU, cuda:3 with two, a typo)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{flag}: {device!r} is not a torch device ({e})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    elif parsed.type not in ("cpu", "mps"):
        raise ValueError(f"{flag} {device}: use cuda, cuda:N or cpu")


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """ValueError unless `path` is a folder, or can be made one, that this process can write:
    probed with a temporary file in it (or in its nearest existing parent, so that nothing
    is created before the command's own checks have passed)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "it" if existing == path else f"its parent {existing}"
        raise ValueError(f"{flag} {path}: {what} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_probe"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {existing}: {e.strerror or e}") from None


def check_weights_file(path: Path, what: str = "weights") -> None:
    """ValueError naming the file unless it is a complete safetensors file whose tensors are
    all finite (a truncated file, a header overwritten, NaN weights from a diverged run)."""
    from longalign_rl.models import check_finite_file, check_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        check_safetensors(path)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    try:
        check_finite_file(path)
    except ValueError as e:
        raise ValueError(f"{what}: {e} (a run that diverged, or a damaged file)") from None


def check_json_file(path: Path, what: str = "config") -> dict:
    """The JSON object in `path`, or ValueError naming the file and where its JSON breaks."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} holds {type(value).__name__}, not a JSON object")
    return value


def check_finite_images(images: torch.Tensor, model: str) -> None:
    """RuntimeError when a model's images hold NaN or infinite pixels: saved, they would be
    black squares that look like a result."""
    bad = (~torch.isfinite(images.flatten(1)).all(dim=1)).sum().item()
    if bad:
        raise RuntimeError(f"{model}: {bad} of {images.shape[0]} images hold NaN or infinite pixels (the model's "
                           "weights or its precision); nothing was written")
