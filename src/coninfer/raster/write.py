"""Write segmentation results: class map and probabilities (COG), vectors, preview PNG, JSON report.

Every writer is atomic through :mod:`coninfer._fs`: it writes a temporary file
(``.<name>.<pid>-<random>.coninfer-tmp<suffix>``) in the destination folder and moves it into place with
``os.replace`` only when complete; on any exit, KeyboardInterrupt included, the temporary files are deleted, and
those of a killed run are removed by the next run on the same output.

Rasters are written block by block, so scenes larger than memory work: the blocks go to a tiled GeoTIFF,
which is then copied to a Cloud-Optimized GeoTIFF (GDAL's COG driver, overviews built by that copy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from PIL import Image, ImageDraw, ImageFont
from rasterio.errors import RasterioError
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from coninfer._fs import atomic_path, check_output_path, temporary_name, write_error  # noqa: F401
from coninfer.raster.read import Georef, _quiet
from coninfer.raster.style import Color, class_colors, class_map_sidecars, write_class_map_sidecars
from coninfer.raster.tiles import NODATA_LABEL, block_windows
from coninfer.raster.vectors import write_vectors  # re-exported: coninfer.raster imports it from here

_COG_OPTIONS = {"compress": "deflate", "blocksize": 512, "bigtiff": "IF_SAFER", "num_threads": "ALL_CPUS"}
"""The COG copy compresses tiles and computes overviews on every core (2 cores: 0.14 -> 0.10 s for a 4000² map)."""
_STAGE_CODECS = ({"compress": "zstd", "zstd_level": 1}, {"compress": "deflate", "zlevel": 1})
"""Compression of the staging file, first that GDAL supports: it is decoded once by the COG copy, so the cheapest
codec that still bounds its size wins (ZSTD level 1 writes a class map ~3x faster than deflate level 1)."""


def default_colors(n: int) -> list[Color]:
    """``n`` distinct RGB colours for classes without names: :func:`~coninfer.raster.style.class_colors`'s
    fallback sequence (prefix-stable: the first colours do not depend on ``n``)."""
    return class_colors([f"class {i}" for i in range(n)])


class _CogWriter:
    """Block-wise writer of a multi-band uint8 COG; use as a context manager (commits on clean exit)."""

    def __init__(
        self,
        path: str | Path,
        georef: Georef,
        *,
        count: int,
        nodata: int | None,
        resampling: str,
        setup: Callable[[DatasetWriter], None],
    ) -> None:
        self.path = Path(path)
        self.georef = georef
        self._resampling = resampling
        self._final = temporary_name(self.path.with_suffix(".tif"))
        self._staging = self._final.with_suffix(".stage.tif")  # still a temporary of the output's name
        profile = georef.profile(count=count, dtype="uint8", nodata=nodata)
        profile.update(tiled=True, blockxsize=512, blockysize=512, bigtiff="IF_SAFER")
        self._dst: DatasetWriter | None = None
        try:
            self._dst = _open_staging(self._staging, profile)
            setup(self._dst)
        except BaseException:  # KeyboardInterrupt too: no stage file may stay behind
            if self._dst is not None:
                self._dst.close()
            self._cleanup()
            raise

    def __enter__(self) -> _CogWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self._dst.close()
            if exc_type is None:
                with _quiet():
                    options = {"overview_resampling": self._resampling, **_COG_OPTIONS}
                    rasterio.shutil.copy(self._staging, self._final, driver="COG", **options)
                try:
                    os.replace(self._final, self.path)
                except OSError as error:
                    raise write_error(self.path, error) from error
        finally:
            self._cleanup()

    def _check_window(self, window: Window, shape: tuple[int, ...]) -> None:
        expected = (int(window.height), int(window.width))
        if shape != expected:
            raise ValueError(f"block shape {shape} does not match window {window} of shape {expected}")

    def _cleanup(self) -> None:
        for temporary in (self._staging, self._final):
            for sidecar in ("", ".aux.xml", ".msk", ".ovr.tmp", ".msk.ovr.tmp"):
                Path(f"{temporary}{sidecar}").unlink(missing_ok=True)


def _open_staging(path: Path, profile: dict) -> DatasetWriter:
    """The staging GeoTIFF, compressed with the first of :data:`_STAGE_CODECS` this GDAL build has."""
    for codec in _STAGE_CODECS[:-1]:
        try:
            with _quiet():
                return rasterio.open(path, "w", **profile, **codec)
        except RasterioError:  # a GDAL built without the codec
            Path(path).unlink(missing_ok=True)
    with _quiet():
        return rasterio.open(path, "w", **profile, **_STAGE_CODECS[-1])


class ClassMapWriter(_CogWriter):
    """uint8 class-map COG on ``georef``: colour table, class names in tags, nodata 255, nearest overviews.

    Tags: ``CLASS_NAMES`` (JSON list) on the dataset and ``CLASS_<i>=<name>`` on band 1. Colours default to
    :func:`~coninfer.raster.style.class_colors` of the names. GDAL category names and the QGIS style are
    sidecar files, written by :func:`write_class_map` or :func:`~coninfer.raster.style.write_class_map_sidecars`.
    """

    def __init__(
        self,
        path: str | Path,
        georef: Georef,
        class_names: Sequence[str],
        colors: Sequence[Color] | None = None,
    ) -> None:
        if not 1 <= len(class_names) <= NODATA_LABEL:
            raise ValueError(f"class_names must hold 1..{NODATA_LABEL} names, got {len(class_names)}")
        colors = class_colors(class_names) if colors is None else list(colors)
        if len(colors) < len(class_names):
            raise ValueError(f"need {len(class_names)} colors, got {len(colors)}")
        self.num_classes = len(class_names)

        def setup(dst: DatasetWriter) -> None:
            colormap = {i: (*colors[i], 255) for i in range(self.num_classes)}
            dst.write_colormap(1, {**colormap, NODATA_LABEL: (0, 0, 0, 0)})
            dst.update_tags(CLASS_NAMES=json.dumps(list(class_names)))
            dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(class_names)})
            dst.set_band_description(1, "class")

        super().__init__(path, georef, count=1, nodata=NODATA_LABEL, resampling="nearest", setup=setup)

    def write(self, window: Window, labels: np.ndarray) -> None:
        """Write labels (h, w) uint8 (class index or 255) at ``window``."""
        self._check_window(window, labels.shape)
        if labels.dtype != np.uint8 or np.any((labels >= self.num_classes) & (labels != NODATA_LABEL)):
            raise ValueError(f"labels must be uint8 in 0..{self.num_classes - 1} or {NODATA_LABEL}")
        self._dst.write(labels, 1, window=window)


class ProbabilityWriter(_CogWriter):
    """Probability COG: one uint8 band per class (``round(255 * p)``), band descriptions = class names,
    invalid pixels in the internal mask (0 is a real probability, so no nodata value), average overviews."""

    def __init__(self, path: str | Path, georef: Georef, class_names: Sequence[str]) -> None:
        self.num_classes = len(class_names)

        def setup(dst: DatasetWriter) -> None:
            for band, name in enumerate(class_names, start=1):
                dst.set_band_description(band, name)

        super().__init__(path, georef, count=len(class_names), nodata=None, resampling="average", setup=setup)

    def write(self, window: Window, probs: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write probabilities (C, h, w) in [0, 1] and validity (h, w) bool (None: all valid) at ``window``."""
        if probs.shape[0] != self.num_classes:
            raise ValueError(f"probs must have {self.num_classes} channels, got shape {probs.shape}")
        self._check_window(window, probs.shape[1:])
        _write_masked(self._dst, window, probs, valid)


class ConfidenceWriter(_CogWriter):
    """Confidence COG: one uint8 band, the top class's probability ``round(255 * max_c p_c)``, band description
    ``confidence``, average overviews. Invalid pixels are 0 and masked out by the internal mask, as in
    :class:`ProbabilityWriter` (so the confidence equals the largest band of the probability file; a nodata
    value of 255 would clash with certain pixels, and 0 may be a real value with over 255 queries)."""

    def __init__(self, path: str | Path, georef: Georef) -> None:
        def setup(dst: DatasetWriter) -> None:
            dst.set_band_description(1, "confidence")

        super().__init__(path, georef, count=1, nodata=None, resampling="average", setup=setup)

    def write(self, window: Window, probs: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write probabilities (C, h, w) in [0, 1] (or their maximum (h, w)) and validity (h, w) bool (None:
        all valid) at ``window``."""
        top = probs if probs.ndim == 2 else probs.max(axis=0)
        self._check_window(window, top.shape)
        _write_masked(self._dst, window, top[None], valid)


def _write_masked(dst: DatasetWriter, window: Window, probs: np.ndarray, valid: np.ndarray | None) -> None:
    """probs (C, h, w) in [0, 1] as uint8 ``round(255 * p)``, 0 where invalid, plus the internal mask."""
    scaled = np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    if valid is not None:
        scaled[:, ~valid] = 0
    dst.write(scaled, window=window)
    mask = np.full(probs.shape[1:], 255, np.uint8) if valid is None else valid.astype(np.uint8) * 255
    dst.write_mask(mask, window=window)


def write_class_map(
    path: str | Path,
    labels: np.ndarray | Iterable[tuple[Window, np.ndarray]],
    georef: Georef,
    class_names: Sequence[str],
    colors: Sequence[Color] | None = None,
    *,
    sidecars: bool = True,
) -> Path:
    """Write a class-map COG (see :class:`ClassMapWriter`) from a full (H, W) uint8 array or from
    ``(window, labels)`` blocks that cover the scene; with ``sidecars``, then its GDAL category names
    (``<path>.aux.xml``) and QGIS style (``<stem>.qml``), each atomically."""
    colors = class_colors(class_names) if colors is None else list(colors)
    with ClassMapWriter(path, georef, class_names, colors) as writer:
        for window, block in _as_blocks(labels, georef):
            writer.write(window, block)
    if sidecars:
        for kind, target in class_map_sidecars(path).items():
            with atomic_path(target) as temporary:
                write_class_map_sidecars({kind: temporary}, class_names, colors)
    return Path(path)


def write_probabilities(
    path: str | Path,
    probs: np.ndarray | Iterable[tuple[Window, np.ndarray, np.ndarray | None]],
    georef: Georef,
    class_names: Sequence[str],
) -> Path:
    """Write a probability COG (see :class:`ProbabilityWriter`) from a full (C, H, W) array in [0, 1] or from
    ``(window, probs, valid)`` blocks."""
    with ProbabilityWriter(path, georef, class_names) as writer:
        if isinstance(probs, np.ndarray):
            for window in block_windows(georef.width, georef.height):
                writer.write(window, probs[(slice(None), *window.toslices())])
        else:
            for window, block, valid in probs:
                writer.write(window, block, valid)
    return Path(path)


def write_preview(
    path: str | Path,
    rgb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Color] | None = None,
    *,
    max_size: int = 1024,
    opacity: float = 0.5,
) -> Path:
    """PNG of the image blended with the class colours, at most ``max_size`` px a side, plus a legend panel
    on the right (coloured squares and names). Pixels labelled 255 show the image alone.

    Args:
        rgb: (3, h, w) uint8 image, e.g. from ``read_overview``; resized to fit ``max_size``.
        labels: (H, W) uint8 class map of the same scene at any size; sampled (nearest) onto the preview.
    """
    colors = class_colors(class_names) if colors is None else list(colors)
    _, height, width = rgb.shape
    scale = min(1.0, max_size / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(np.moveaxis(rgb, 0, -1)).resize(size, Image.Resampling.BOX))
    rows = np.arange(size[1]) * labels.shape[0] // size[1]
    cols = np.arange(size[0]) * labels.shape[1] // size[0]
    sampled = labels[np.ix_(rows, cols)]
    lut = np.zeros((256, 3), np.float32)
    lut[: len(class_names)] = np.asarray(colors[: len(class_names)], np.float32)
    drawn = (sampled < len(class_names))[..., None]
    blended = np.where(drawn, (1 - opacity) * image + opacity * lut[sampled], image)
    canvas = _with_legend(Image.fromarray(np.rint(blended).astype(np.uint8)), class_names, colors)
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
    return Path(path)


def write_report(path: str | Path, report: Mapping) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def count_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class (num_classes,) int64 of a labels block (h, w) uint8; 255 (invalid) is not counted.
    Sum the counts of all blocks for a scene."""
    if labels.dtype == np.uint8:
        # torch counts uint8 as it is; numpy's bincount first widens every label to int64 (2.3x slower here)
        import torch

        flat = torch.from_numpy(np.ascontiguousarray(labels)).reshape(-1)
        return torch.bincount(flat, minlength=256)[:num_classes].numpy()
    return np.bincount(labels.ravel(), minlength=256)[:num_classes].astype(np.int64)


def class_areas(labels: np.ndarray, window: Window, georef: Georef, num_classes: int,
                counts: np.ndarray | None = None) -> np.ndarray:
    """Area per class (num_classes,) float64 in :attr:`Georef.area_unit` of a labels block (h, w) uint8 at
    ``window``; 255 (invalid) is not counted. Sum the areas of all blocks for a scene (needed for a geographic
    CRS, whose pixels differ in area). ``counts``: the block's :func:`count_classes`, if the caller has them.

    Where every pixel has the same area (any CRS but a geographic one) the area is the count times that area,
    one correctly rounded product per class and block (a sum of equal terms before: the same where the pixel area is a
    power of two, like 0.5 m pixels' 0.25 m², and within float64 rounding of it elsewhere)."""
    areas = georef.pixel_areas(window)
    if areas.size == 1:
        counts = count_classes(labels, num_classes) if counts is None else counts
        return counts * float(areas[0, 0])
    areas = np.broadcast_to(areas, labels.shape)
    return np.bincount(labels.ravel(), weights=areas.ravel(), minlength=256)[:num_classes]


def class_statistics(
    counts: np.ndarray, class_names: Sequence[str], georef: Georef, areas: np.ndarray | None = None
) -> list[dict]:
    """One dict per class: ``class_id``, ``class_name``, ``pixels``, ``fraction`` (of valid pixels),
    ``area`` in ``area_unit`` (m² for a projected or geographic CRS): ``areas`` from :func:`class_areas`, by
    default pixels x :attr:`Georef.pixel_area`, which only a geographic CRS must not rely on."""
    if areas is None:
        areas = counts * georef.pixel_area
    total = int(counts.sum())
    return [
        {
            "class_id": class_id,
            "class_name": name,
            "pixels": int(counts[class_id]),
            "fraction": int(counts[class_id]) / total if total else 0.0,
            "area": float(areas[class_id]),
            "area_unit": georef.area_unit,
        }
        for class_id, name in enumerate(class_names)
    ]


def _as_blocks(labels: np.ndarray | Iterable[tuple[Window, np.ndarray]], georef: Georef):
    if not isinstance(labels, np.ndarray):
        return labels
    if labels.shape != (georef.height, georef.width):
        raise ValueError(f"labels must have shape {(georef.height, georef.width)}, got {labels.shape}")
    return ((w, labels[w.toslices()]) for w in block_windows(georef.width, georef.height))


def _with_legend(image: Image.Image, class_names: Sequence[str], colors: Sequence[Color]) -> Image.Image:
    """``image`` with a white legend panel on its right: one row (square + name) per class."""
    # Pillow's default font at 14 px (FreeType); Pillow falls back to its bitmap font without FreeType
    font = ImageFont.load_default(size=14)
    row_height, square, margin = 20, 14, 8
    text_width = max(int(font.getlength(name)) for name in class_names)
    panel = (margin + square + 6 + text_width + margin, margin * 2 + row_height * len(class_names))
    canvas = Image.new("RGB", (image.width + panel[0], max(image.height, panel[1])), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(class_names):
        x, y = image.width + margin, margin + i * row_height
        draw.rectangle([x, y, x + square - 1, y + square - 1], fill=tuple(colors[i]), outline="black")
        draw.text((x + square + 6, y), name, fill="black", font=font)
    return canvas


__all__ = [
    "ClassMapWriter",
    "ConfidenceWriter",
    "ProbabilityWriter",
    "atomic_path",
    "check_output_path",
    "class_areas",
    "class_statistics",
    "count_classes",
    "default_colors",
    "write_class_map",
    "write_preview",
    "write_probabilities",
    "write_report",
    "write_vectors",
]
