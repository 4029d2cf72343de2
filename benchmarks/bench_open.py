"""Time ``open_scene`` against one full read of the same file, on mosaics of the real sample.

Builds, in a temporary folder, mosaics of ../shared/data/oem_koeln_50.tif tiled n x n (deflate, 256² tiles,
no overviews): a uint8 RGB one (as the sample) and a uint16 one with nodata 0 in its first 100 columns (so
the stretch and the mask need a sample). For each it times, in fresh processes' worth of fresh datasets:

- ``full``: one full read of every band, window by window (strips of 512 rows: bounded memory);
- ``open``: ``open_scene`` with GDAL_CACHEMAX in bytes (256 MiB, as :func:`gdal_cache_env` sets it) and with
  the old buggy ``GDAL_CACHEMAX=256`` (256 bytes);
- ``old``: the former open, one decimated read of the whole scene (data and masks), with both caches (the
  256-byte run only up to 4000², it takes minutes beyond).

Run: ``.venv/bin/python benchmarks/bench_open.py --sizes 4000 20000`` (the 20000² mosaics take ~1 min each
to build and 2.3 GB of disk; ``--keep DIR`` reuses them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from coninfer.raster import open_scene
from coninfer.raster.source import GDAL_CACHE_BYTES

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "oem_koeln_50.tif"


def build(folder: Path, size: int, variant: str) -> Path:
    """The size² mosaic of SAMPLE (size a multiple of 1000), built once per folder."""
    path = folder / f"mosaic_{variant}_{size}.tif"
    if path.exists():
        return path
    with rasterio.open(SAMPLE) as src:
        tile, profile = src.read(), src.profile
    nodata = None
    if variant == "uint16":
        tile, nodata = tile.astype(np.uint16) * 4 + 1, 0
    profile.update(width=size, height=size, dtype=str(tile.dtype), nodata=nodata, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", bigtiff="IF_SAFER")
    repeats = size // tile.shape[1]
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(path, "w", **profile) as dst:
        for row in range(repeats):
            strip = np.concatenate([tile] * repeats, axis=2)
            if nodata is not None:
                strip[:, :, :100] = nodata
            dst.write(strip, window=Window(0, row * tile.shape[1], size, tile.shape[1]))
    return path


def full_read(path: Path) -> float:
    started = time.perf_counter()
    with rasterio.open(path) as src:
        for top in range(0, src.height, 512):
            src.read(window=Window(0, top, src.width, min(512, src.height - top)))
    return time.perf_counter() - started


def old_open(path: Path) -> float:
    """The former open: one decimated read (1024 px long side) of data and masks."""
    started = time.perf_counter()
    with rasterio.open(path) as src:
        scale = 1024 / max(src.height, src.width)
        shape = (3, round(src.height * scale), round(src.width * scale))
        src.read(out_shape=shape, resampling=Resampling.nearest)
        src.read_masks(out_shape=shape, resampling=Resampling.nearest)
    return time.perf_counter() - started


def new_open(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    scene = open_scene(path)
    return time.perf_counter() - started, scene.stats_source


def measure(path: Path, size: int) -> None:
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        full = full_read(path)
        opened, how = new_open(path)
        old = old_open(path)
    with rasterio.Env(GDAL_CACHEMAX=256):
        opened_buggy, _ = new_open(path)
        old_buggy = old_open(path) if size <= 4000 else float("nan")
    print(f"{path.name:<28} full {full:7.3f} s | open {opened:7.3f} s = {opened / full:5.3f} x full ({how}); "
          f"cache=256 B: {opened_buggy:7.3f} s | old open {old:7.3f} s = {old / full:5.2f} x; "
          f"cache=256 B: {old_buggy:8.3f} s = {old_buggy / full:6.1f} x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000])
    parser.add_argument("--variants", nargs="+", default=["uint8", "uint16"], choices=["uint8", "uint16"])
    parser.add_argument("--keep", type=Path, help="folder to build the mosaics in and keep them")
    args = parser.parse_args()
    os.environ.pop("GDAL_CACHEMAX", None)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            for variant in args.variants:
                measure(build(folder, size, variant), size)


if __name__ == "__main__":
    main()
