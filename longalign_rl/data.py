"""Stage 1's image-caption pairs: reading and checking a source, and the Ray Data pipeline
that streams them to the trainer workers.

`data.source` is one of
    a folder          every image (.png .jpg .jpeg .webp .bmp, subfolders included) with a
                      same-named .txt caption beside it (cat.png + cat.txt)
    a .jsonl file     one {"image": "a.png", "caption": "..."} object per line
    a .csv file       a header row naming the image and caption columns, one pair per row
    "shapesworld"     the built-in synthetic world of long captions (shapesworld/):
                      data.kwargs n and seed, the rest are WorldConfig fields
    "pkg.module:fn"   fn(**data.kwargs) returns an iterable of (uint8 [H, W, 3] image, caption)

Column names are `data.image_column` / `data.caption_column`; image paths in a manifest are
relative to the manifest's folder. Everything that can be checked without decoding images is
checked on the driver, before a run directory exists: bad lines are reported together with
their file and line number, and every image must exist. Images are decoded later, on Ray
Data workers, a batch at a time.

Pure python/numpy/PIL except `build_dataset`, which imports Ray Data.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from longalign_rl.config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Rows per batch when decoding images or collecting a generator's output on Ray Data workers.
ROWS_PER_BATCH = 32


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
    elif path.is_file() and path.suffix == ".jsonl":
        pairs = _jsonl_pairs(path, image_column, caption_column)
    elif path.is_file() and path.suffix == ".csv":
        pairs = _csv_pairs(path, image_column, caption_column)
    elif path.is_file():
        raise DataSourceError(f"data source {source!r}: a manifest must be a .jsonl or .csv file")
    else:
        raise DataSourceError(f"data source {source!r} does not exist (a folder, a .jsonl or .csv manifest, "
                              "'shapesworld' or 'pkg.module:function')")
    if not pairs:
        raise DataSourceError(f"data source {source!r} holds no image-caption pairs")
    return pairs


# ---------------------------------------------------------------- generators


def shapesworld(n: int = 1000, seed: int = 0, **world) -> list[tuple[np.ndarray, str]]:
    """n ShapesWorld (image, caption) pairs; `world` are WorldConfig fields (image_size, grid, ...)."""
    from longalign_rl.shapesworld import WorldConfig, make_dataset

    return [(image, caption) for image, caption, _ in make_dataset(WorldConfig(**world), n, seed)]


def is_generator(source: str) -> bool:
    return source == "shapesworld" or (":" in source and not Path(source).exists())


def find_generator(source: str) -> Callable[..., Iterable]:
    """"shapesworld" or "pkg.module:function" -> the function."""
    if source == "shapesworld":
        return shapesworld
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataSourceError(f"data.source {source!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataSourceError(f"data.source {source!r}: module {module_name!r} has no function {attr!r}")
    return fn


def check_generator(source: str, kwargs: dict) -> None:
    """The generator imports and accepts `kwargs` (it is not called: it may be expensive)."""
    fn = find_generator(source)
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise DataSourceError(f"data.kwargs {kwargs} do not fit {source!r}: {e}") from None
    if fn is shapesworld:
        from longalign_rl.shapesworld import WorldConfig

        world = {k: v for k, v in kwargs.items() if k not in ("n", "seed")}
        try:
            WorldConfig(**world)
        except (TypeError, ValueError) as e:
            raise DataSourceError(f"data.kwargs {kwargs}: not a ShapesWorld config: {e}") from None


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


def to_training_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, resolution, resolution] in [0, 1]: the shorter side
    resized to `resolution` (bicubic), then the centre cropped."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    pil = Image.fromarray(image)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (RGB; alpha dropped, greyscale expanded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:
        raise DataSourceError(f"image {path}: cannot be read ({e})") from None


def _rows(images: list[np.ndarray], captions: list[str], resolution: int) -> dict[str, np.ndarray]:
    return {"image": np.stack([to_training_image(im, resolution) for im in images]),
            "caption": np.array(captions, dtype=object)}


def load_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: {"path", "caption"} rows -> {"image" float32 [B, 3, R, R], "caption"}."""
    return _rows([read_image(str(p)) for p in batch["path"]], [str(c) for c in batch["caption"]], resolution)


def generate_batches(_: dict, source: str, kwargs: dict, resolution: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: runs the generator on a Ray worker and yields its pairs as training rows,
    ROWS_PER_BATCH at a time (the input, one dummy row, starts it)."""
    images, captions = [], []
    for index, item in enumerate(find_generator(source)(**kwargs)):
        image, caption = check_pair(item, index, source)
        images.append(image)
        captions.append(caption)
        if len(images) == ROWS_PER_BATCH:
            yield _rows(images, captions, resolution)
            images, captions = [], []
    if images:
        yield _rows(images, captions, resolution)


# ---------------------------------------------------------------- the pipeline


def check_source(data: DataConfig) -> list[Pair] | None:
    """On the driver, before anything starts: the pairs of a folder or manifest (every entry
    checked, every image found), or None for a generator (import and kwargs checked)."""
    if is_generator(data.source):
        check_generator(data.source, data.kwargs)
        return None
    return read_pairs(data.source, image_column=data.image_column, caption_column=data.caption_column)


def build_dataset(data: DataConfig, seed: int, pairs: list[Pair] | None = None):
    """The `ray.data.Dataset` of {"image": float32 [3, R, R] in [0, 1], "caption": str} rows.

    `pairs`: `check_source(data)`'s result when the caller has it (a folder or manifest is
    read again otherwise). File sources hold only paths and captions on the driver; Ray Data
    workers decode the images a batch at a time while the trainers consume them. A generator
    runs in one Ray Data task per epoch (it should be seeded: each epoch calls it again).
    With `data.shuffle` every epoch has another order, seeded by `seed`.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    shuffle_seed = RandomSeedConfig(seed=seed, reseed_after_execution=True)  # a new order each epoch
    if is_generator(data.source):
        ds = ray.data.range(1).map_batches(
            generate_batches, batch_size=None,
            fn_kwargs={"source": data.source, "kwargs": dict(data.kwargs), "resolution": data.resolution})
        return ds.random_shuffle(seed=shuffle_seed) if data.shuffle else ds
    pairs = pairs if pairs is not None else check_source(data)
    ds = ray.data.from_items([{"path": p.image, "caption": p.caption} for p in pairs])
    if data.shuffle:  # shuffle the paths, before the (much larger) images exist
        ds = ds.random_shuffle(seed=shuffle_seed)
    return ds.map_batches(load_batch, batch_size=ROWS_PER_BATCH, fn_kwargs={"resolution": data.resolution})
