"""Areas in square metres for rasters in a geographic CRS (longitude/latitude), on the CRS's ellipsoid.

A pixel of a lon/lat raster covers fewer square metres towards the poles, so its area is not a constant. The
area between the equator and latitude ``phi`` per radian of longitude is, on an ellipsoid with semi-major axis
``a`` and squared eccentricity ``e2`` (the authalic-latitude integral, Snyder 1987, eq. 3-12)::

    F(phi) = a² / 2 * q(phi),
    q(phi) = (1 - e2) * (sin phi / (1 - e2 sin² phi) - 1 / (2 e) * ln((1 - e sin phi) / (1 + e sin phi)))

(``q = 2 sin phi`` on a sphere) and its derivative, the area element per radian², is
``a² (1 - e2) cos phi / (1 - e2 sin² phi)²``. A polygon's area is then the trapezoid sum over its edges of
``d(lon) * (F(lat_i) + F(lat_i+1)) / 2``, exact for edges along meridians and parallels (every edge of a
polygonised north-up raster).
"""

from __future__ import annotations

import math
import re

import numpy as np
from rasterio.crs import CRS

WGS84 = (6378137.0, 1 / 298.257223563)
"""(semi-major axis in metres, flattening) used when the CRS names no ellipsoid."""

_ELLIPSOID = re.compile(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)')


def ellipsoid(crs: CRS) -> tuple[float, float]:
    """(semi-major axis a in metres, squared eccentricity e2) of ``crs``'s ellipsoid (WGS 84 if unnamed)."""
    match = _ELLIPSOID.search(crs.to_wkt())
    axis, flattening = WGS84
    if match:
        axis, inverse_flattening = float(match.group(1)), float(match.group(2))
        flattening = 1.0 / inverse_flattening if inverse_flattening > 0 else 0.0  # 0: a sphere
    return axis, flattening * (2.0 - flattening)


def radians_per_unit(crs: CRS) -> float:
    """Radians in one angular unit of a geographic CRS (pi/180 for degrees)."""
    return float(crs.units_factor[1])


def zone_area(latitude: np.ndarray, axis: float, e2: float) -> np.ndarray:
    """F(phi): m² between the equator and ``latitude`` (radians) per radian of longitude, signed like phi."""
    sin = np.sin(np.clip(latitude, -math.pi / 2, math.pi / 2))
    if e2 == 0.0:
        return axis**2 * sin
    e = math.sqrt(e2)
    q = (1 - e2) * (sin / (1 - e2 * sin**2) - np.log((1 - e * sin) / (1 + e * sin)) / (2 * e))
    return axis**2 / 2 * q


def area_density(latitude: np.ndarray, axis: float, e2: float) -> np.ndarray:
    """dF/dphi: m² per radian² of longitude x latitude at ``latitude`` (radians); 0 beyond the poles."""
    latitude = np.clip(latitude, -math.pi / 2, math.pi / 2)  # padding past a pole covers no ground
    sin = np.sin(latitude)
    return axis**2 * (1 - e2) * np.cos(latitude) / (1 - e2 * sin**2) ** 2


def ring_area(lon_lat: np.ndarray, crs: CRS) -> float:
    """Unsigned area in m² of a closed ring (n, 2) of (lon, lat) in ``crs``'s angular unit."""
    axis, e2 = ellipsoid(crs)
    scale = radians_per_unit(crs)
    lon, zone = lon_lat[:, 0] * scale, zone_area(lon_lat[:, 1] * scale, axis, e2)
    return 0.5 * abs(float(np.dot(lon[1:] - lon[:-1], zone[1:] + zone[:-1])))


__all__ = ["WGS84", "area_density", "ellipsoid", "radians_per_unit", "ring_area", "zone_area"]
