"""Synthetic scenes and tiny models shared by the pipeline, scene and `coninfer segment` tests.

Scenes are written on demand into a test's folder: a projected CRS (UTM 32N, 0.5 m pixels), non-square sizes
that are not multiples of the test tile sizes, seeded pixels. Models are the offline ``tiny-random`` presets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine

CRS = "EPSG:32632"
PIXEL_SIZE = 0.5
TRANSFORM = Affine(PIXEL_SIZE, 0.0, 356000.0, 0.0, -PIXEL_SIZE, 5645000.0)
WIDTH, HEIGHT = 75, 53
NODATA = 0
NODATA_COLS = 10
"""The multispectral scene's first NODATA_COLS columns are nodata."""
CLASSES = "building;road;tree;water"
CLASS_NAMES = ["building", "road", "tree", "water"]
TINY = ["--vlm", "tiny-random", "--vfm", "tiny-random"]
FAST = ["--tile-size", "32", "--model-res", "32", "--batch-size", "4"]
"""CLI options of a quick run: 2 x 2 patches per tile."""


def _write(path: Path, data: np.ndarray, **profile) -> Path:
    count, height, width = data.shape
    base = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": str(data.dtype),
            "crs": CRS, "transform": TRANSFORM}
    with rasterio.open(path, "w", **{**base, **profile}) as dst:
        dst.write(data)
    return path


def multispectral(path: Path, *, width: int = WIDTH, height: int = HEIGHT, count: int = 5, seed: int = 0) -> Path:
    """``count``-band uint16 scene, nodata 0 in the first NODATA_COLS columns; smooth blobs so that classes form
    regions. Band b (1-based) holds values around 1000 * b."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    bands = []
    for band in range(1, count + 1):
        phase = rng.uniform(0, 2 * np.pi, 2)
        pattern = np.sin(rows / 7.0 + phase[0]) * np.cos(cols / 9.0 + phase[1])
        bands.append(1000 * band + 400 * pattern + rng.integers(0, 50, (height, width)))
    data = np.stack(bands).astype(np.uint16)
    data[:, :, :NODATA_COLS] = NODATA
    return _write(path, data, nodata=NODATA)


def rgb(path: Path, pixels: np.ndarray) -> Path:
    """3-band uint8 scene from (H, W, 3) pixels, no nodata."""
    return _write(path, np.ascontiguousarray(np.moveaxis(pixels, -1, 0)))


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth random image."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    rows = np.arange(height) * (coarse.shape[0] - 1) // max(1, height - 1)
    cols = np.arange(width) * (coarse.shape[1] - 1) // max(1, width - 1)
    noise = rng.integers(-10, 10, (height, width, 3))
    return np.clip(coarse[np.ix_(rows, cols)] + noise, 0, 255).astype(np.uint8)


def two_bands(path: Path) -> Path:
    """2-band uint8 scene (too few for RGB without --bands)."""
    return _write(path, np.full((2, HEIGHT, WIDTH), 100, np.uint8))


def all_nodata(path: Path) -> Path:
    """3-band uint16 scene in which every pixel is nodata."""
    return _write(path, np.zeros((3, HEIGHT, WIDTH), np.uint16), nodata=NODATA)


def files_in(folder: Path) -> set[str]:
    """Names of every file under ``folder`` (relative), to check that a failed run wrote nothing."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny models' operations are so small that waking a second thread costs more
    than it saves (many times more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
