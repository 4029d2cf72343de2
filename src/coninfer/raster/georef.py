"""Georeferencing of a scene in every form GDAL knows, and the areas of its pixels.

A raster is placed on the ground by one of:

- a geotransform (an affine pixel -> map transform) and a CRS: the usual GeoTIFF;
- ground control points (GCPs) and their CRS: scanned maps, unrectified imagery;
- rational polynomial coefficients (RPCs): satellite imagery before orthorectification (lon/lat, WGS 84);
- nothing: a plain PNG or JPEG.

:class:`Georef` keeps whichever the input has, so outputs created from :meth:`Georef.profile` carry the same,
and computes areas on :attr:`Georef.grid_transform`: the geotransform, else the affine transform fitted to the
GCPs (``rasterio.transform.from_gcps``, least squares), else the same fit to points the RPC model places on
the ground (lon/lat in WGS 84 at the model's height offset: an RPC model maps to WGS 84 by definition), else
the identity (areas in pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.rpc import RPC
from rasterio.transform import RPCTransformer, from_gcps
from rasterio.windows import Window

from coninfer.raster import geodesy


@dataclass(frozen=True)
class Georef:
    """Pixel grid of a scene: size, CRS, geotransform, GCPs and RPCs.

    ``crs`` is the CRS of map coordinates: the dataset's, or the GCPs' CRS for a raster placed by GCPs; None
    when the raster has neither. ``transform`` is the dataset's geotransform (the identity when it has none).
    ``gcps`` and ``rpcs`` are empty / None unless the input carries them.
    """

    width: int
    height: int
    crs: CRS | None
    transform: Affine
    gcps: tuple[GroundControlPoint, ...] = ()
    rpcs: RPC | None = None

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"Georef width and height must be >= 1, got {self.width}x{self.height}")
        if self.gcps and len(self.gcps) < 3:
            raise ValueError(f"Georef needs at least 3 GCPs to place a grid, got {len(self.gcps)}")
        object.__setattr__(self, "gcps", tuple(self.gcps))

    @property
    def has_geotransform(self) -> bool:
        return not self.transform.is_identity

    @property
    def kind(self) -> str:
        """How the raster is placed: "geotransform", "gcps", "rpcs" or "none" (for reports)."""
        if self.has_geotransform:
            return "geotransform"
        return "gcps" if self.gcps else "rpcs" if self.rpcs is not None else "none"

    @cached_property
    def grid_transform(self) -> Affine:
        """Affine pixel -> map transform behind areas, resolution and vectors: the geotransform, else the
        least-squares fit to the GCPs, else the fit to ground points of the RPC model, else the identity."""
        if self.has_geotransform:
            return self.transform
        if self.gcps:
            return from_gcps(list(self.gcps))
        if self.rpcs is not None:
            return from_gcps(self._rpc_points())
        return self.transform

    @property
    def ground_crs(self) -> CRS | None:
        """CRS of :attr:`grid_transform`'s coordinates: :attr:`crs`, or WGS 84 for a raster placed by RPCs
        alone (the output files carry the RPCs, not this CRS)."""
        if self.crs is None and self.rpcs is not None and not self.has_geotransform and not self.gcps:
            return CRS.from_epsg(4326)
        return self.crs

    def _rpc_points(self, steps: int = 5) -> list[GroundControlPoint]:
        """A steps x steps grid of pixel corners placed by the RPC model at its height offset."""
        rows = np.linspace(0, self.height, steps)
        cols = np.linspace(0, self.width, steps)
        grid_rows, grid_cols = (values.ravel() for values in np.meshgrid(rows, cols, indexing="ij"))
        with RPCTransformer(self.rpcs) as transformer:
            xs, ys = transformer.xy(grid_rows, grid_cols, zs=self.rpcs.height_off, offset="ul")
        return [GroundControlPoint(row=float(r), col=float(c), x=float(x), y=float(y))
                for r, c, x, y in zip(grid_rows, grid_cols, xs, ys, strict=True)]

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units of :attr:`grid_transform`, as rasterio's ``dataset.res``."""
        a, b, _, d, e, _ = self.grid_transform[:6]
        return math.hypot(a, d), math.hypot(b, e)

    @property
    def is_projected(self) -> bool:
        """True when the CRS is projected, so areas can be given in m²."""
        return self.ground_crs is not None and self.ground_crs.is_projected

    @property
    def linear_units(self) -> str | None:
        """Name of the projected CRS's linear unit ("metre", "US survey foot"), None otherwise."""
        return self.ground_crs.linear_units_factor[0] if self.is_projected else None

    @property
    def metres_per_unit(self) -> float | None:
        """Length of one projected CRS unit in metres (0.3048... for feet), None when not projected."""
        return self.ground_crs.linear_units_factor[1] if self.is_projected else None

    @property
    def is_geographic(self) -> bool:
        """True when the CRS is longitude/latitude, so a pixel's area in m² depends on its latitude."""
        return self.ground_crs is not None and self.ground_crs.is_geographic

    @property
    def area_unit(self) -> str:
        """Unit of :meth:`pixel_areas`: "m2" (projected or geographic CRS), "pixel" (no CRS, identity
        grid) or "map_unit2" (no CRS but a transform)."""
        if self.is_projected or self.is_geographic:
            return "m2"
        return "pixel" if self.grid_transform.is_identity else "map_unit2"

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in :attr:`area_unit`: ``|a*e - b*d|`` of :attr:`grid_transform`, times the squared
        metre factor of the CRS unit when projected (so feet become m²). For a geographic CRS, where the area
        depends on the latitude, the area of the scene's centre pixel (use :meth:`pixel_areas` to sum)."""
        if self.is_geographic:
            centre = Window(self.width // 2, self.height // 2, 1, 1)
            return float(self.pixel_areas(centre)[0, 0])
        a, b, _, d, e, _ = self.grid_transform[:6]
        area = abs(a * e - b * d)
        return area * self.metres_per_unit**2 if self.is_projected else area

    def pixel_areas(self, window: Window) -> np.ndarray:
        """Area of each pixel of ``window`` in :attr:`area_unit`, float64 broadcastable to (h, w): (1, 1) when
        constant, (h, 1) for a geographic CRS whose latitude follows the rows, else (h, w).

        Geographic CRS: each pixel's area on the CRS's ellipsoid (:mod:`coninfer.raster.geodesy`), exact
        between the latitudes of its edges when latitude depends on the row only, else from the area element
        at its centre.
        """
        if not self.is_geographic:
            return np.full((1, 1), self.pixel_area)
        axis, e2 = geodesy.ellipsoid(self.ground_crs)
        scale = geodesy.radians_per_unit(self.ground_crs)
        a, b, _, d, e, f = self.grid_transform[:6]
        rows = window.row_off + np.arange(int(window.height), dtype=np.float64)
        if d == 0:  # latitude = f + e * row: exact zone area between the pixel's top and bottom edges
            top = geodesy.zone_area((f + e * rows) * scale, axis, e2)
            bottom = geodesy.zone_area((f + e * (rows + 1)) * scale, axis, e2)
            return (abs(a) * scale * np.abs(bottom - top))[:, None]
        cols = window.col_off + np.arange(int(window.width), dtype=np.float64)
        latitude = (f + d * (cols[None, :] + 0.5) + e * (rows[:, None] + 0.5)) * scale
        return abs(a * e - b * d) * scale**2 * geodesy.area_density(latitude, axis, e2)

    def profile(self, *, count: int, dtype: str, nodata: float | None = None) -> dict:
        """rasterio creation profile of a GeoTIFF on this grid, placed as the input is: ``crs`` and
        ``transform`` for a geotransform, ``gcps`` (with ``crs`` as their CRS) for GCPs, ``rpcs`` for RPCs."""
        profile = {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": count,
            "dtype": dtype,
            "crs": self.crs,
            "nodata": nodata,
        }
        if self.kind in ("geotransform", "none"):
            profile["transform"] = self.transform
        elif self.gcps:
            profile["gcps"] = list(self.gcps)
        if self.rpcs is not None:
            profile["rpcs"] = self.rpcs
        return profile


__all__ = ["Georef"]
