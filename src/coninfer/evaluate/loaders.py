"""Read a converted benchmark: (image, label) pairs in the order mmsegmentation's ``BaseSegDataset`` gives them.

Order matters for ConInfer because one Gaussian mixture is fitted over each batch of consecutive images. mmseg lists
``img_dir`` recursively and sorts by image path, or, when the dataset has a split file (WBS-SI), keeps the file's
line order; so do we. Labels are read at their stored resolution and decoded with the dataset's label encoding.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from coninfer.errors import InputError, InputFileError
from coninfer.evaluate.specs import DatasetSpec, LabelEncoding

_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One evaluation image and its label; ``name`` is the image path relative to ``img_dir``."""

    name: str
    image_path: Path
    label_path: Path


def _convert_hint(spec: DatasetSpec) -> str:
    return f"run `coninfer data convert {spec.name} RAW_DIR DATA_ROOT` first (RAW_DIR: {spec.converter.raw_layout})"


def resolve_data_root(spec: DatasetSpec, data_root: str | Path) -> Path:
    """The dataset folder: ``data_root`` itself, or ``data_root/<layout.root>`` (a SegEarth-OV ``data/`` folder)."""
    data_root = Path(data_root)
    for candidate in (data_root, data_root / spec.layout.root):
        if (candidate / spec.layout.img_dir).is_dir():
            return candidate
    raise InputFileError(
        f"{spec.name}: image folder {spec.layout.img_dir!r} not found under {data_root}", hint=_convert_hint(spec)
    )


def _image_names(spec: DatasetSpec, root: Path) -> list[str]:
    img_dir = root / spec.layout.img_dir
    suffix = spec.layout.img_suffix
    if spec.layout.split_file is None:
        # mmseg: recursive listing, str.endswith(suffix) (case-sensitive), sorted by path
        names = [p.relative_to(img_dir).as_posix() for p in img_dir.rglob(f"*{suffix}") if p.is_file()]
        return sorted(n for n in names if n.endswith(suffix))
    split_path = root / spec.layout.split_file
    if not split_path.is_file():
        raise InputFileError(
            f"{spec.name}: split file {split_path} not found",
            hint=f"copy {spec.layout.split_file} (SegEarth-OV tools/dataset_converters/) next to {spec.layout.img_dir}",
        )
    stems = [line.strip() for line in split_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [stem + suffix for stem in stems]


def list_samples(spec: DatasetSpec, data_root: str | Path) -> list[Sample]:
    """All (image, label) pairs of a converted dataset, in evaluation order; checks that every file exists."""
    root = resolve_data_root(spec, data_root)
    img_dir, ann_dir = root / spec.layout.img_dir, root / spec.layout.ann_dir
    samples = []
    for name in _image_names(spec, root):
        stem = name[: -len(spec.layout.img_suffix)]
        samples.append(Sample(name, img_dir / name, ann_dir / (stem + spec.layout.ann_suffix)))
    if not samples:
        raise InputFileError(
            f"{spec.name}: no *{spec.layout.img_suffix} images in {img_dir}", hint=_convert_hint(spec)
        )
    missing = [s for s in samples if not s.image_path.is_file() or not s.label_path.is_file()]
    if missing:
        shown = ", ".join(str(p) for s in missing[:3] for p in (s.image_path, s.label_path) if not p.is_file())
        raise InputFileError(
            f"{spec.name}: {len(missing)} of {len(samples)} samples lack their image or label file, e.g. {shown}",
            hint=_convert_hint(spec),
        )
    return samples


def iter_pairs(spec: DatasetSpec, data_root: str | Path) -> Iterator[tuple[Path, Path]]:
    """(image_path, label_path) of every sample, in evaluation order."""
    for sample in list_samples(spec, data_root):
        yield sample.image_path, sample.label_path


_WARNINGS_LOCK = threading.Lock()
"""warnings.catch_warnings swaps process-wide state: two threads inside it at once can restore each other's
filters (a warning then leaks, or stays silenced for good). The evaluation reads images in several threads."""


def _read_tiff(path: Path) -> np.ndarray:
    import rasterio

    with _WARNINGS_LOCK, warnings.catch_warnings():  # rasterio warns at open; the read runs unlocked
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        src = rasterio.open(path)
    with src:
        bands = src.read()  # (bands, H, W)
    return np.moveaxis(bands, 0, -1)  # -> (H, W, bands)


def read_image(path: str | Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB (GeoTIFF via rasterio: first three bands; others via Pillow)."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            array = _read_tiff(path)
            if array.shape[-1] == 1:
                array = np.repeat(array, 3, axis=-1)
            array = array[..., :3]
        else:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise InputFileError(f"cannot read image {path}: {error}", hint="check the file; re-run the converter") from error
    if array.dtype != np.uint8:
        raise InputError(f"image {path} has dtype {array.dtype}", hint="benchmark images are 8-bit RGB")
    return np.ascontiguousarray(array)


def decode_label(stored: np.ndarray, encoding: LabelEncoding) -> np.ndarray:
    """Stored label values -> evaluation indices (H, W) uint8; applies mmseg's ``reduce_zero_label``."""
    label = stored.astype(np.uint8, copy=True)
    if encoding.reduce_zero_label:
        # mmseg: 0 -> 255, k -> k-1, and 255 stays 255 (255 - 1 = 254 is mapped back)
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


def read_label(path: str | Path, encoding: LabelEncoding) -> np.ndarray:
    """A label map as (H, W) uint8 evaluation indices at its stored resolution."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            stored = _read_tiff(path)
            stored = stored[..., 0] if stored.shape[-1] == 1 else stored
        else:
            with Image.open(path) as image:
                stored = np.asarray(image)  # "P" images give their indices, as mmseg's pillow backend does
    except OSError as error:
        raise InputFileError(f"cannot read label {path}: {error}", hint="check the file; re-run the converter") from error
    if stored.ndim != 2:
        raise InputError(
            f"label {path} has shape {stored.shape}; expected a single-band index map",
            hint="colour-coded labels must be converted first (`coninfer data convert`)",
        )
    return decode_label(stored, encoding)


def load_sample(spec: DatasetSpec, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, label (H, W) uint8) of one sample; refuses a label of another size than its image.

    Predictions are made at the image's size and scored against the label pixel for pixel, so a size mismatch
    is a damaged or wrongly converted file: it is named here rather than surfacing later as a shape error.
    """
    image, label = read_image(sample.image_path), read_label(sample.label_path, spec.label_encoding)
    if image.shape[:2] != label.shape:
        (image_h, image_w), (label_h, label_w) = image.shape[:2], label.shape
        raise InputError(
            f"{spec.name}: label {sample.label_path} is {label_w}x{label_h} px but its image {sample.image_path} "
            f"is {image_w}x{image_h} px",
            hint=f"re-run `coninfer data convert {spec.name} RAW_DIR DATA_ROOT`, or replace the label with one of "
            "the image's size",
        )
    return image, label
