"""Tests of coninfer.raster.georef: each form of georeferencing is kept at open and carried to outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasters
from affine import Affine

from coninfer.raster import Georef, open_scene


def _write_and_reopen(georef: Georef, path: Path):
    """Write a 1-band output through Georef.profile() with rasterio, return the reopened dataset's metadata."""
    with rasterio.open(path, "w", **georef.profile(count=1, dtype="uint8", nodata=255)) as dst:
        dst.write(np.zeros((1, georef.height, georef.width), np.uint8))
    with rasterio.open(path) as src:
        return src.crs, src.transform, src.gcps, src.rpcs


class TestGeotransform:
    def test_kept_and_written(self, tmp_path: Path) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")
        georef = open_scene(tmp_path / "a.tif").georef
        assert georef.kind == "geotransform" and georef.gcps == () and georef.rpcs is None
        crs, transform, (gcps, _), rpcs = _write_and_reopen(georef, tmp_path / "out.tif")
        assert crs.to_epsg() == 25832 and transform == rasters.TRANSFORM and gcps == [] and rpcs is None


class TestGcps:
    def test_kept_with_their_crs(self, tmp_path: Path) -> None:
        rasters.gcp_uint8(tmp_path / "g.tif")
        georef = open_scene(tmp_path / "g.tif").georef
        assert georef.kind == "gcps" and len(georef.gcps) == 4
        assert georef.crs.to_epsg() == 25832 and georef.transform.is_identity
        assert [(p.row, p.col, p.x, p.y) for p in georef.gcps] == list(rasters.GCPS)

    def test_areas_from_the_gcp_transform(self, tmp_path: Path) -> None:
        rasters.gcp_uint8(tmp_path / "g.tif")
        georef = open_scene(tmp_path / "g.tif").georef
        assert georef.grid_transform.almost_equals(rasters.TRANSFORM)
        assert georef.area_unit == "m2" and georef.pixel_area == pytest.approx(0.25)
        assert georef.res == pytest.approx((0.5, 0.5))

    def test_output_reopens_with_the_same_gcps_and_crs(self, tmp_path: Path) -> None:
        rasters.gcp_uint8(tmp_path / "g.tif")
        georef = open_scene(tmp_path / "g.tif").georef
        crs, transform, (gcps, gcp_crs), _ = _write_and_reopen(georef, tmp_path / "out.tif")
        assert transform.is_identity and gcp_crs.to_epsg() == 25832
        assert [(p.row, p.col, p.x, p.y) for p in gcps] == list(rasters.GCPS)

    def test_too_few_gcps(self) -> None:
        with pytest.raises(ValueError, match="at least 3 GCPs"):
            Georef(4, 4, None, Affine.identity(), gcps=(object(),) * 2)


class TestRpcs:
    def test_kept_and_written(self, tmp_path: Path) -> None:
        rasters.rpc_uint8(tmp_path / "r.tif")
        georef = open_scene(tmp_path / "r.tif").georef
        assert georef.kind == "rpcs" and georef.rpcs.lat_off == rasters.RPCS.lat_off
        # the RPCs are affine here: lon = 6.96 + (col - 37) * 0.01 / 38, lat = 50.94 - (row - 26) * 0.01 / 27,
        # which the fit to the model's ground points must recover, in WGS 84. RPC line/sample numbers count pixel
        # centres from 0, GDAL's grid counts pixel corners, hence the half pixel: column 37 of the RPCs is 37.5 here
        transform = georef.grid_transform
        assert georef.ground_crs.to_epsg() == 4326 and georef.crs is None and georef.area_unit == "m2"
        np.testing.assert_allclose(transform[:6], [0.01 / 38, 0, 6.96 - 37.5 * 0.01 / 38,
                                                   0, -0.01 / 27, 50.94 + 26.5 * 0.01 / 27], rtol=0, atol=1e-9)
        width = 0.01 / 38 * math.radians(1) * 6378137 * math.cos(math.radians(50.94))  # m, spherical estimate
        assert georef.pixel_area == pytest.approx(width * 0.01 / 27 * 111_250, rel=0.01)
        _, _, _, rpcs = _write_and_reopen(georef, tmp_path / "out.tif")
        assert rpcs is not None and rpcs.samp_num_coeff == rasters.RPCS.samp_num_coeff
        assert rpcs.long_off == rasters.RPCS.long_off


class TestNone:
    def test_plain_png(self, tmp_path: Path) -> None:
        rasters.plain_png(tmp_path / "p.png")
        georef = open_scene(tmp_path / "p.png").georef
        assert georef.kind == "none" and georef.crs is None and georef.area_unit == "pixel"
        profile = georef.profile(count=1, dtype="uint8")
        assert profile["transform"] == Affine.identity() and "gcps" not in profile and "rpcs" not in profile
