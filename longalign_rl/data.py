"""Stage 1's image-caption pairs: reading and checking a source, the order every step's
global batch takes them in (`GlobalOrder`), and loading a batch of them as training rows.

`data.source` is one of
    a folder          every image (.png .jpg .jpeg .webp .bmp, subfolders included) with a
                      same-named .txt caption beside it (cat.png + cat.txt)
    a .jsonl file     one {"image": "a.png", "caption": "..."} object per line
    a .csv file       a header row naming the image and caption columns, one pair per row
    "pkg.module:fn"   fn(**data.kwargs) returns an iterable of (uint8 [H, W, 3] image, caption)
                      pairs (a world's generator, say); it runs once per run, in one Ray
                      task (`generate_rows`), and its rows are shared through the object store.
                      On the driver its kwargs are bound to its signature, and a function
                      with a `validate` attribute gets `fn.validate(**data.kwargs)` too (a
                      cheap check that raises ValueError), so bad kwargs fail before the run

Column names are `data.image_column` / `data.caption_column`; image paths in a manifest are
relative to the manifest's folder. Everything that can be checked without decoding images is
checked on the driver, before a run directory exists: bad lines are reported together with
their file and line number, and every image must exist. Images are decoded later, by the
trainer worker that trains on them, a micro-batch at a time (training/denoising.py).

Which pairs a step trains on is a function of (train.seed, epoch, global position) alone
(`GlobalOrder`), never of a worker's rank or the number of workers: the same global batch
split another way trains on the same pairs (docs/scaling.md).

Pure python/numpy/PIL (torchvision for `data.resize: bilinear`).
"""

from __future__ import annotations

import csv
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from longalign_rl.config import DataConfig
from longalign_rl.registry import resolve_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataSourceError(ValueError):
    """A data source that cannot be used; the message names the file and the bad lines."""


@dataclass(frozen=True)
class Pair:
    image: str    # absolute path of the image file
    caption: str


# ---------------------------------------------------------------- files and manifests


def _report(where: str, errors: list[str]) -> None:
    if errors:
        shown = "\n".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise DataSourceError(f"{where} has {len(errors)} bad entr{'y' if len(errors) == 1 else 'ies'}:\n{shown}")


def _folder_pairs(folder: Path) -> list[Pair]:
    pairs, errors = [], []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        text = image.with_suffix(".txt")
        if not text.is_file():
            errors.append(f"  {image}: no caption file {text.name} beside it")
            continue
        caption = text.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            errors.append(f"  {text}: empty caption")
            continue
        pairs.append(Pair(str(image.resolve()), caption))
    _report(f"image folder {str(folder)!r}", errors)
    return pairs


def _manifest_pair(record, manifest: Path, image_column: str, caption_column: str) -> Pair:
    """One manifest record -> its pair; ValueError says what is wrong (the caller adds the line)."""
    values = {}
    for column in (image_column, caption_column):
        value = record.get(column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"column {column!r} is missing or empty")
        values[column] = value.strip()
    image = Path(values[image_column])
    image = image if image.is_absolute() else manifest.parent / image
    if not image.is_file():
        raise ValueError(f"image {values[image_column]!r} (column {image_column!r}) does not exist: {image}")
    return Pair(str(image.resolve()), values[caption_column])


def _jsonl_pairs(path: Path, image_column: str, caption_column: str) -> list[Pair]:
    pairs, errors = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8").lstrip("\ufeff").strip()
            if not text:
                continue
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            pairs.append(_manifest_pair(record, path, image_column, caption_column))
        except UnicodeDecodeError as e:
            errors.append(f"  line {number}: not UTF-8 ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            errors.append(f"  line {number}: not JSON ({e.msg})")
        except ValueError as e:
            errors.append(f"  line {number}: {e}")
    _report(f"manifest {str(path)!r}", errors)
    return pairs


def _csv_pairs(path: Path, image_column: str, caption_column: str) -> list[Pair]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise DataSourceError(f"manifest {str(path)!r}: no column {missing[0]!r} in its header {header} "
                                  "(set data.image_column / data.caption_column)")
        pairs, errors = [], []
        for record in reader:
            try:
                pairs.append(_manifest_pair(record, path, image_column, caption_column))
            except ValueError as e:
                errors.append(f"  line {reader.line_num}: {e}")
    _report(f"manifest {str(path)!r}", errors)
    return pairs


def read_pairs(source: str, *, image_column: str = "image", caption_column: str = "caption") -> list[Pair]:
    """A folder, .jsonl or .csv source -> its pairs, in file order, every image found on disk."""
    path = Path(source)
    if path.is_dir():
        pairs = _folder_pairs(path)
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        pairs = _jsonl_pairs(path, image_column, caption_column)
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path, image_column, caption_column)
    elif path.is_file():
        raise DataSourceError(f"data source {source!r}: a manifest must be a .jsonl or .csv file")
    else:
        raise DataSourceError(f"data source {source!r} does not exist (a folder, a .jsonl or .csv manifest, "
                              "or 'pkg.module:function')")
    if not pairs:
        raise DataSourceError(f"data source {source!r} holds no image-caption pairs")
    return pairs


# ---------------------------------------------------------------- generators


def _resolve(source: str):
    try:
        return resolve_source(source, key="data.source", path_kind="folder or .jsonl / .csv manifest")
    except ValueError as e:
        raise DataSourceError(str(e)) from None


def is_generator(source: str) -> bool:
    return _resolve(source).kind == "import"


def find_generator(source: str) -> Callable[..., Iterable]:
    """"pkg.module:function" -> the function."""
    fn = _resolve(source).target
    if not callable(fn):
        raise DataSourceError(f"data.source {source!r} is not a function")
    return fn


def check_generator(source: str, kwargs: dict) -> None:
    """The generator imports and accepts `kwargs` (it is not called: it may be expensive;
    its `validate`, if it has one, is)."""
    fn = find_generator(source)
    try:
        inspect.signature(fn).bind(**kwargs)
        validate = getattr(fn, "validate", None)
        if validate is not None:
            validate(**kwargs)
    except (TypeError, ValueError) as e:
        raise DataSourceError(f"data.kwargs {kwargs} do not fit {source!r}: {e}") from None


def check_pair(item, index: int, source: str) -> tuple[np.ndarray, str]:
    """A generator's item -> (uint8 [H, W, 3] image, caption), or an error naming the item."""
    ok = isinstance(item, (tuple, list)) and len(item) == 2
    image, caption = item if ok else (None, None)
    if not (ok and isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and isinstance(caption, str) and caption.strip()):
        got = (f"({type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}, "
               f"{type(caption).__name__})" if ok else type(item).__name__)
        raise DataSourceError(f"data source {source!r}, item {index}: expected (uint8 [H, W, 3] array, "
                              f"non-empty caption str), got {got}")
    return image, caption.strip()


# ---------------------------------------------------------------- images


def to_training_image(image: np.ndarray, resolution: int, resize: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, resolution, resolution] in [0, 1]: the shorter side
    resized to `resolution`, then the centre cropped. `resize` (data.resize): "bicubic", or
    "bilinear": the reference's own transforms, torchvision's Resize(resolution, bilinear)
    and CenterCrop on the PIL image, so that its rounding of sizes and offsets is kept too."""
    return training_crop(image, resolution, resize)[0]


def training_crop(image: np.ndarray, resolution: int, resize: str = "bicubic") -> tuple[np.ndarray, list[int]]:
    """`to_training_image`, and where the crop came from: [original height, original width,
    crop top, crop left] (the crop's offsets in the resized image), what SDXL's size
    conditioning takes (families/sdxl.py; diffusers' SDXL training scripts compute the same)."""
    from PIL import Image

    h, w = image.shape[:2]
    if resize == "bilinear":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        pil = TF.resize(Image.fromarray(image), resolution, InterpolationMode.BILINEAR)
        top, left = int(round((pil.height - resolution) / 2.0)), int(round((pil.width - resolution) / 2.0))
        array = np.asarray(TF.center_crop(pil, resolution), dtype=np.float32).transpose(2, 0, 1) / 255.0
        return array, [h, w, top, left]
    if resize != "bicubic":
        raise ValueError(f"resize must be bicubic or bilinear, got {resize!r}")
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    pil = Image.fromarray(image)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0, [h, w, top, left]


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (RGB; alpha dropped, greyscale expanded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:
        raise DataSourceError(f"image {path}: cannot be read ({e})") from None


def _rows(images: list[np.ndarray], captions: list[str], resolution: int, resize: str) -> dict[str, np.ndarray]:
    crops = [training_crop(im, resolution, resize) for im in images]
    return {"image": np.stack([array for array, _ in crops]), "caption": np.array(captions, dtype=object),
            "size": np.array([size for _, size in crops], dtype=np.int64)}


def load_pairs(pairs: list[Pair], resolution: int, resize: str = "bicubic") -> dict[str, np.ndarray]:
    """Pairs of files -> {"image" float32 [B, 3, R, R], "caption" [B], "size" int64 [B, 4]}:
    decoded and cropped; "size" is each image's original height and width and the crop's
    top-left offsets (`training_crop`)."""
    return _rows([read_image(p.image) for p in pairs], [p.caption for p in pairs], resolution, resize)


def generate_rows(source: str, kwargs: dict, resolution: int, resize: str = "bicubic") -> dict[str, np.ndarray]:
    """Every pair a generator gives, as training rows {"image" float32 [N, 3, R, R],
    "caption" [N]} (each item checked; an error names the first bad one)."""
    images, captions = [], []
    for index, item in enumerate(find_generator(source)(**kwargs)):
        image, caption = check_pair(item, index, source)
        images.append(image)
        captions.append(caption)
    if not images:
        raise DataSourceError(f"data source {source!r} gave no pairs")
    return _rows(images, captions, resolution, resize)


# ---------------------------------------------------------------- the global order


class GlobalOrder:
    """Which of `n` pairs each step trains on, for a global batch of `global_batch` pairs.

    Epoch e is a permutation of the pairs (seeded by (seed, e) when shuffled, in source
    order otherwise) cut into `steps_per_epoch = n // global_batch` global batches; the
    last n % global_batch pairs of each epoch's order are not trained on that epoch (with
    shuffling, other ones each epoch). Step s is global batch s % steps_per_epoch of epoch
    s // steps_per_epoch, and its pairs are numbered 0 .. global_batch - 1 in that order:
    the same for any split of the batch over workers and micro-steps."""

    def __init__(self, n: int, global_batch: int, seed: int, shuffle: bool):
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.steps_per_epoch = n // global_batch
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                     else np.arange(self.n))
            self._cached = (epoch, order)
        return self._cached[1]

    def pairs(self, step: int, first: int, count: int) -> list[int]:
        """The indices of pairs `first` .. `first + count - 1` of step `step`'s global batch."""
        if first < 0 or first + count > self.global_batch:
            raise IndexError(f"pairs {first}..{first + count - 1} of a global batch of {self.global_batch}")
        start = (step % self.steps_per_epoch) * self.global_batch + first
        return [int(i) for i in self.order(self.epoch_of(step))[start:start + count]]


# ---------------------------------------------------------------- checks on the driver


def check_source(data: DataConfig) -> list[Pair] | None:
    """On the driver, before anything starts: the pairs of a folder or manifest (every entry
    checked, every image found), or None for a generator (import and kwargs checked)."""
    if is_generator(data.source):
        check_generator(data.source, data.kwargs)
        return None
    return read_pairs(data.source, image_column=data.image_column, caption_column=data.caption_column)
