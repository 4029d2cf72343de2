"""Tests of coninfer.raster.sample (how open_scene samples a scene) and of the GDAL cache setting."""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasters

from coninfer.raster import GDAL_CACHE_BYTES, gdal_cache_env, open_scene, sample
from coninfer.raster.sample import sample_windows

SIZE, BLOCK = 512, 64


@pytest.fixture
def small_budget(monkeypatch) -> None:
    """A block sample of 16 blocks of 64², so a 512² raster (64 blocks) is sampled, not read whole."""
    monkeypatch.setattr(sample, "BLOCK_SAMPLE_PIXELS", 16 * BLOCK * BLOCK)


def _ramp(values_from: int = 1000) -> np.ndarray:
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([values_from + rows + cols] * 3).astype(np.uint16)


class TestSampleWindows:
    def test_even_grid_within_budget(self) -> None:
        windows = sample_windows(SIZE, SIZE, (BLOCK, BLOCK), 16 * BLOCK * BLOCK)
        assert len(windows) == 16 and all(w.width == BLOCK and w.height == BLOCK for w in windows)
        assert {w.row_off for w in windows} == {64, 192, 320, 448} == {w.col_off for w in windows}

    def test_strips_are_grouped(self) -> None:
        assert sample_windows(1000, 300, (2, 300), 10**9)[-1].height == 40  # the last chunk is clipped
        windows = sample_windows(1000, 300, (2, 300), 64 * 300 * 3)
        assert len(windows) == 3 and all(w.width == 300 for w in windows)
        assert [(w.row_off, w.height) for w in windows] == [(128, 64), (512, 64), (832, 64)]
        assert sample_windows(10, 10, (256, 256), 1)[0].width == 10


class TestSampleChoice:
    def test_block_sample_of_a_large_file(self, tmp_path: Path, small_budget) -> None:
        rasters.tiled(tmp_path / "t.tif", _ramp(), block=BLOCK, nodata=0)
        scene = open_scene(tmp_path / "t.tif")
        assert scene.stats_source == "blocks" and scene.valid_fraction == 1.0
        for low, high in scene.stretch:  # values 1000..2022, percentiles 1101 and 1921 over the whole ramp
            assert 1000 < low < 1200 and 1820 < high < 2022

    def test_empty_sample_falls_back_to_the_whole_scene(self, tmp_path: Path, small_budget) -> None:
        data = np.zeros((3, SIZE, SIZE), np.uint16)
        data[:, 10:50, 10:50] = 500  # valid only inside block (0, 0), which the sample skips
        rasters.tiled(tmp_path / "t.tif", data, block=BLOCK, nodata=0)
        scene = open_scene(tmp_path / "t.tif")
        assert scene.stats_source == "decimated" and 0.0 < scene.valid_fraction < 0.02

    def test_overviews_are_used(self, tmp_path: Path, small_budget) -> None:
        rasters.tiled(tmp_path / "t.tif", _ramp(), block=BLOCK, nodata=0, overviews=True)
        assert open_scene(tmp_path / "t.tif").stats_source == "overviews"

    def test_small_file_is_read_decimated(self, tmp_path: Path) -> None:
        rasters.tiled(tmp_path / "t.tif", _ramp(), block=BLOCK, nodata=0)
        assert open_scene(tmp_path / "t.tif").stats_source == "decimated"

    def test_uint8_without_mask_is_not_read(self, tmp_path: Path, monkeypatch) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")

        def fail(*args, **kwargs):
            raise AssertionError("uint8 RGB without a mask needs no sample")

        monkeypatch.setattr("coninfer.raster.read.sample_scene", fail)
        scene = open_scene(tmp_path / "a.tif")
        assert scene.stats_source == "none" and scene.stretch is None and scene.valid_fraction == 1.0


def _gdal_cache_max() -> int:
    """GDAL's effective block cache size in bytes, asked from the libgdal rasterio loaded."""
    libs = os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*")
    found = glob.glob(libs)
    if not found:
        pytest.skip("rasterio does not bundle libgdal here: cannot ask GDALGetCacheMax64")
    library = ctypes.CDLL(found[0])
    library.GDALGetCacheMax64.restype = ctypes.c_int64
    return library.GDALGetCacheMax64()


class TestGdalCacheEnv:
    def test_cache_is_256_mib_not_256_bytes(self, monkeypatch) -> None:
        monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
        assert GDAL_CACHE_BYTES == 256 * 2**20
        with gdal_cache_env():
            assert rasterio.env.getenv()["GDAL_CACHEMAX"] == 256 * 2**20
            assert _gdal_cache_max() == 256 * 2**20

    def test_the_users_setting_wins(self, monkeypatch) -> None:
        monkeypatch.setenv("GDAL_CACHEMAX", "64")
        with gdal_cache_env():
            assert "GDAL_CACHEMAX" not in rasterio.env.getenv()
