"""The sample of a scene behind its stretch and its valid fraction, read in bounded memory and time.

One of three ways, the cheapest that is faithful (measured in ``benchmarks/bench_open.py``):

- ``"overviews"``: the file has overviews: one decimated read (``STATS_SIZE`` px along the longer side);
  GDAL serves it from the overviews, a few percent of a full read;
- ``"decimated"``: a small file (at most 2 x :data:`BLOCK_SAMPLE_PIXELS`): the same decimated read, which
  decompresses every block once, read in strips of rows so each strip's blocks serve both data and masks;
- ``"blocks"``: a large file without overviews: whole blocks (or strips) on an even grid over the scene, up
  to :data:`BLOCK_SAMPLE_PIXELS` source pixels, each subsampled so the sample holds about ``STATS_SIZE²``
  values. On a 20000² deflate mosaic this reads ~1 % of the file (0.15 s against 7.6 s for a full read).
  When no sampled pixel is valid, the decimated read over the whole scene decides (no scene is called empty
  from a sample).

A decimated read takes the nearest pixel, so a valid area thinner than about 1/``STATS_SIZE`` of the scene's
longer side can be missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.io import DatasetReader
from rasterio.windows import Window

from coninfer.raster.bands import BandReader

STATS_SIZE = 1024
"""Longest side, in pixels, of the decimated read behind the stretch and the emptiness check (~1024² samples)."""

BLOCK_SAMPLE_PIXELS = 4 * 2**20
"""Source pixels read by a block sample (about 4 M: 64 blocks of 256², 16 of 512²)."""

STRIP_ROWS = 512
"""Source rows per strip of a decimated read without overviews."""


@dataclass(frozen=True)
class Sample:
    """Pixels of a scene sample: ``data`` (3, n) in the band dtype, ``valid`` (n,) bool, and ``source``
    ("overviews", "decimated" or "blocks")."""

    data: np.ndarray
    valid: np.ndarray
    source: str


def sample_scene(src: DatasetReader, reader: BandReader) -> Sample:
    """Read the statistics sample of ``src`` (see the module docstring for the choice of reads)."""
    if src.overviews(reader.bands[0]):
        data, valid = decimated_read(src, reader, STATS_SIZE)
        return Sample(data.reshape(3, -1), valid.ravel(), "overviews")
    if src.width * src.height > 2 * BLOCK_SAMPLE_PIXELS:
        sample = _block_sample(src, reader)
        if sample.valid.any():
            return sample
    data, valid = decimated_read(src, reader, STATS_SIZE)
    return Sample(data.reshape(3, -1), valid.ravel(), "decimated")


def decimated_read(src: DatasetReader, reader: BandReader, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole scene decimated (nearest) so its longer side is at most ``max_size``: (3, h, w), (h, w).

    Without overviews it reads strips of :data:`STRIP_ROWS` source rows, so a strip's blocks are still in
    GDAL's cache when its masks are read.
    """
    out_h, out_w = decimated_shape(src.height, src.width, max_size)
    if src.overviews(reader.bands[0]) or out_h == src.height:
        return reader.read(src, out_shape=(out_h, out_w))
    step = max(1, STRIP_ROWS * out_h // src.height)  # output rows per strip
    parts = []
    for top in range(0, out_h, step):
        bottom = min(out_h, top + step)
        row0, row1 = round(top * src.height / out_h), round(bottom * src.height / out_h)
        window = Window(0, row0, src.width, max(1, row1 - row0))
        parts.append(reader.read(src, window=window, out_shape=(bottom - top, out_w)))
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=0)


def decimated_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a read whose longer side is at most ``max_size``, keeping the aspect ratio."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def sample_windows(height: int, width: int, block: tuple[int, int], budget: int) -> list[Window]:
    """Whole-block windows on an even (stratified) grid over a (height, width) raster, ``budget`` pixels at most (at
    least one window). Strips (blocks under 64 rows) are grouped into chunks of at least 64 rows."""
    block_h, block_w = block
    block_h = block_h * math.ceil(64 / block_h) if block_h < 64 else block_h
    block_w = min(block_w, width)
    grid_rows, grid_cols = math.ceil(height / block_h), math.ceil(width / block_w)
    count = max(1, budget // (block_h * block_w))
    picked_rows = min(grid_rows, count, max(1, round(math.sqrt(count * grid_rows / grid_cols))))
    picked_cols = min(grid_cols, max(1, count // picked_rows))
    # the centre block of each of picked_rows x picked_cols equal strata: no bias towards the edges
    rows = np.unique(((np.arange(picked_rows) + 0.5) * grid_rows / picked_rows).astype(int))
    cols = np.unique(((np.arange(picked_cols) + 0.5) * grid_cols / picked_cols).astype(int))
    return [
        Window(c * block_w, r * block_h, min(block_w, width - c * block_w), min(block_h, height - r * block_h))
        for r in rows
        for c in cols
    ]


def _block_sample(src: DatasetReader, reader: BandReader) -> Sample:
    windows = sample_windows(src.height, src.width, src.block_shapes[reader.bands[0] - 1], BLOCK_SAMPLE_PIXELS)
    pixels = sum(int(w.width) * int(w.height) for w in windows)
    stride = max(1, math.ceil(math.sqrt(pixels / STATS_SIZE**2)))
    data, valid = [], []
    for window in windows:
        block, mask = reader.read(src, window=window)
        data.append(block[:, ::stride, ::stride].reshape(3, -1))
        valid.append(mask[::stride, ::stride].ravel())
    return Sample(np.concatenate(data, axis=1), np.concatenate(valid), "blocks")


__all__ = [
    "BLOCK_SAMPLE_PIXELS",
    "STATS_SIZE",
    "STRIP_ROWS",
    "Sample",
    "decimated_read",
    "decimated_shape",
    "sample_scene",
    "sample_windows",
]
