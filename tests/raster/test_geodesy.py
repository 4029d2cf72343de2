"""Tests of coninfer.raster.geodesy and the areas of geographic (lon/lat) rasters in m²."""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from coninfer.raster import Georef
from coninfer.raster.geodesy import area_density, ellipsoid, ring_area, zone_area

WGS84 = CRS.from_epsg(4326)
WGS84_SURFACE_M2 = 5.10065621724e14
"""Surface of the WGS 84 ellipsoid."""


class TestEllipsoid:
    def test_parameters_from_the_crs(self) -> None:
        axis, e2 = ellipsoid(WGS84)
        assert axis == 6378137.0 and e2 == pytest.approx(0.00669437999014)
        assert ellipsoid(CRS.from_proj4("+proj=longlat +R=6371000 +no_defs")) == (6371000.0, 0.0)

    def test_density_is_the_derivative_of_the_zone_area(self) -> None:
        axis, e2 = ellipsoid(WGS84)
        latitude, step = np.radians([0.0, 31.0, -62.5, 80.0]), 1e-6
        slope = (zone_area(latitude + step, axis, e2) - zone_area(latitude - step, axis, e2)) / (2 * step)
        np.testing.assert_allclose(slope, area_density(latitude, axis, e2), rtol=1e-8)

    def test_one_degree_cell_at_the_equator(self) -> None:
        square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], float)
        # the integral of the area element over 0..1 degree of latitude, by the trapezoid rule
        axis, e2 = ellipsoid(WGS84)
        latitude = np.linspace(0.0, math.radians(1), 100_001)
        expected = np.trapezoid(area_density(latitude, axis, e2), latitude) * math.radians(1)
        assert ring_area(square, WGS84) == pytest.approx(expected, rel=1e-9)
        assert ring_area(square, WGS84) == pytest.approx(12_308.46e6, rel=1e-6)
        sphere = CRS.from_proj4("+proj=longlat +R=6371000 +no_defs")
        assert ring_area(square, sphere) == pytest.approx(6371000.0**2 * math.radians(1) * math.sin(math.radians(1)))


class TestGeographicGeoref:
    def test_whole_globe_sums_to_the_ellipsoid_surface(self) -> None:
        globe = Georef(360, 180, WGS84, Affine(1.0, 0.0, -180.0, 0.0, -1.0, 90.0))
        areas = globe.pixel_areas(Window(0, 0, 360, 180))
        assert areas.shape == (180, 1) and globe.area_unit == "m2"
        assert float(areas.sum()) * 360 == pytest.approx(WGS84_SURFACE_M2, rel=1e-9)
        assert areas[0, 0] < areas[89, 0]  # pixels shrink towards the poles
        assert globe.pixel_area == pytest.approx(float(areas[90, 0]))  # the centre pixel's

    def test_south_up_and_sheared_rasters(self) -> None:
        north_up = Georef(40, 30, WGS84, Affine(1e-3, 0.0, 10.0, 0.0, -1e-3, 50.0))
        reference = float(np.broadcast_to(north_up.pixel_areas(Window(0, 0, 40, 30)), (30, 40)).sum())
        south_up = Georef(40, 30, WGS84, Affine(1e-3, 0.0, 10.0, 0.0, 1e-3, 50.0 - 30e-3))
        assert float(south_up.pixel_areas(Window(0, 0, 40, 30)).sum()) * 40 == pytest.approx(reference, rel=1e-12)
        # latitude varying along the columns too: the area element at each pixel's centre
        rotated = Georef(40, 30, WGS84, Affine(1e-3, 0.0, 10.0, 1e-9, -1e-3, 50.0))
        areas = rotated.pixel_areas(Window(0, 0, 40, 30))
        assert areas.shape == (30, 40) and float(areas.sum()) == pytest.approx(reference, rel=1e-6)

    def test_projected_and_plain_grids_keep_a_constant_area(self) -> None:
        utm = Georef(4, 3, CRS.from_epsg(32632), Affine(0.5, 0.0, 0.0, 0.0, -0.5, 0.0))
        assert utm.pixel_areas(Window(0, 0, 4, 3)).tolist() == [[0.25]]
        assert Georef(4, 3, None, Affine.identity()).pixel_areas(Window(1, 1, 2, 2)).tolist() == [[1.0]]
