"""Vector output: one dissolved MultiPolygon per class of a class map, to GeoPackage or GeoJSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import fiona
import numpy as np
import rasterio
from rasterio import features

from coninfer.errors import OutputError
from coninfer.raster import geodesy, write
from coninfer.raster.read import Georef, _quiet
from coninfer.raster.style import Color, class_colors, hex_color

_VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def write_vectors(
    path: str | Path,
    class_map: str | Path | np.ndarray,
    class_names: Sequence[str],
    georef: Georef | None = None,
    *,
    layer: str | None = None,
    colors: Sequence[Color] | None = None,
) -> Path:
    """Write one dissolved MultiPolygon per present class to GeoPackage (.gpkg) or GeoJSON (.geojson/.json).

    GDAL's polygonize (4-connected) merges touching pixels of a value into one polygon; the polygons of a class
    become the parts of its MultiPolygon. Attributes: ``class_id``, ``class_name``, ``color`` (``#rrggbb``, default
    :func:`~coninfer.raster.style.class_colors`; QGIS: data-defined fill colour), ``area`` and ``area_unit``
    (see :attr:`Georef.area_unit`: m² for a projected or geographic CRS, else map units² or pixels), polygon
    areas summed by the shoelace formula (on the ellipsoid for a geographic CRS, see
    :mod:`~coninfer.raster.geodesy`). Coordinates are in the input CRS. Classes absent from the map get no feature.
    GDAL reads a class-map file block by block, but all polygons are held in memory until written.

    Args:
        class_map: path of a written class map (its grid is used) or an (H, W) uint8 array with ``georef``.
        layer: layer name [default: the file name without its suffix].
    """
    path = Path(path)
    driver = _VECTOR_DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise OutputError(
            f"cannot write vectors to {path}: unknown extension {path.suffix!r}",
            hint="use a .gpkg or .geojson file name",
        )
    if isinstance(class_map, np.ndarray):
        if georef is None:
            raise ValueError("georef is needed when class_map is an array")
        parts = _polygons_by_class(class_map, georef, len(class_names))
    else:
        with _quiet(), rasterio.open(class_map) as src:
            gcps, gcp_crs = src.gcps
            crs = src.crs if src.crs else (gcp_crs if gcps else None)
            # a GCP-georeferenced class map: polygons in the GCPs' CRS, through their fitted transform
            georef = Georef(src.width, src.height, crs, src.transform, gcps=tuple(gcps) if gcps else (),
                            rpcs=src.rpcs)
            # GDAL polygonizes a band in its dataset's own geotransform (identity for GCPs and RPCs): those
            # read the array
            placed = georef.has_geotransform or not (georef.gcps or georef.rpcs)
            band = rasterio.band(src, 1) if placed else src.read(1)
            parts = _polygons_by_class(band, georef, len(class_names))
    schema = {
        "geometry": "MultiPolygon",
        "properties": {"class_id": "int", "class_name": "str", "color": "str", "area": "float", "area_unit": "str"},
    }
    colors = class_colors(class_names) if colors is None else list(colors)
    layer = re.sub(r"\W", "_", layer or path.stem)  # GPKG layer names allow no dots or spaces
    with (
        write.atomic_path(path) as temporary,
        fiona.open(temporary, "w", driver=driver, schema=schema, crs=georef.ground_crs, layer=layer) as sink,
    ):
        for class_id, polygons in sorted(parts.items()):
            area = sum(_polygon_area(rings, georef) for rings in polygons)
            properties = {"class_id": class_id, "class_name": class_names[class_id], "color": hex_color(colors[class_id]),
                          "area": area}
            properties["area_unit"] = georef.area_unit
            sink.write(
                {"geometry": {"type": "MultiPolygon", "coordinates": polygons}, "properties": properties}
            )
    return path


def _polygons_by_class(source, georef: Georef, num_classes: int) -> dict[int, list]:
    """class id -> list of polygons (each a list of rings of (x, y)) from GDAL polygonize."""
    parts: dict[int, list] = {}
    for geometry, value in features.shapes(source, connectivity=4, transform=georef.grid_transform):
        class_id = int(value)
        if class_id < num_classes:  # 255 (invalid) and stray values are not classes
            parts.setdefault(class_id, []).append(geometry["coordinates"])
    return parts


def _polygon_area(rings: list, georef: Georef) -> float:
    """Area of a polygon (exterior ring then holes) in :attr:`Georef.area_unit`."""
    areas = []
    for ring in rings:
        xy = np.asarray(ring, dtype=np.float64)
        if georef.is_geographic:
            areas.append(geodesy.ring_area(xy, georef.ground_crs))
            continue
        x, y = xy[:, 0], xy[:, 1]
        areas.append(0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    area = areas[0] - sum(areas[1:])
    return area * georef.metres_per_unit**2 if georef.is_projected else area


__all__ = ["write_vectors"]
