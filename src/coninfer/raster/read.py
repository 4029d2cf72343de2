"""Open an input scene once, then read it window by window as 8-bit RGB plus a validity mask.

``open_scene`` checks the file and the band choice, and reads one decimated copy of the scene (at most
``STATS_SIZE`` pixels along its longer side) to learn everything that needs the whole scene: the per-band
stretch for non-uint8 data and whether any pixel is valid at all. Nothing else reads more than one window.

Validity follows GDAL's mask bands (``read_masks``), so a nodata value, an alpha band and an internal or
``.msk`` mask all work the same way: a pixel is valid when any selected band's mask is non-zero (GDAL's
dataset-mask rule, so a dark pixel with one channel equal to nodata stays valid). Float data also needs
finite values.

A rasterio dataset is not thread-safe: read each scene from one thread, or open one dataset per thread.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window, WindowError

from coninfer.errors import InputError, InputFileError
from coninfer.raster import geodesy

STATS_SIZE = 1024
"""Longest side, in pixels, of the decimated read behind the stretch and the emptiness check (~1024² samples)."""

STRETCH_PERCENTILES = (2.0, 98.0)
"""Percentiles of the valid pixels of each band mapped to 0 and 255 for data that is not uint8."""

_BANDS_HINT = "pass --bands with 3 distinct 1-based band indexes (e.g. --bands 3,2,1) or one band (--bands 1)"


@dataclass(frozen=True)
class Georef:
    """Pixel grid of a scene: size, CRS (None when not georeferenced) and affine pixel -> map transform."""

    width: int
    height: int
    crs: CRS | None
    transform: Affine

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"Georef width and height must be >= 1, got {self.width}x{self.height}")

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units, as rasterio's ``dataset.res``."""
        a, b, _, d, e, _ = self.transform[:6]
        return math.hypot(a, d), math.hypot(b, e)

    @property
    def is_projected(self) -> bool:
        """True when the CRS is projected, so areas can be given in m²."""
        return self.crs is not None and self.crs.is_projected

    @property
    def linear_units(self) -> str | None:
        """Name of the projected CRS's linear unit ("metre", "US survey foot"), None otherwise."""
        return self.crs.linear_units_factor[0] if self.is_projected else None

    @property
    def metres_per_unit(self) -> float | None:
        """Length of one projected CRS unit in metres (0.3048... for feet), None when not projected."""
        return self.crs.linear_units_factor[1] if self.is_projected else None

    @property
    def is_geographic(self) -> bool:
        """True when the CRS is longitude/latitude, so a pixel's area in m² depends on its latitude."""
        return self.crs is not None and self.crs.is_geographic

    @property
    def area_unit(self) -> str:
        """Unit of :meth:`pixel_areas`: "m2" (projected or geographic CRS), "pixel" (no CRS, identity
        transform) or "map_unit2" (no CRS but a transform)."""
        if self.is_projected or self.is_geographic:
            return "m2"
        return "pixel" if self.transform.is_identity else "map_unit2"

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in :attr:`area_unit`: ``|a*e - b*d|`` of the transform, times the squared metre
        factor of the CRS unit when projected (so feet become m²). For a geographic CRS, where the area depends
        on the latitude, the area of the scene's centre pixel (use :meth:`pixel_areas` to sum areas)."""
        if self.is_geographic:
            centre = Window(self.width // 2, self.height // 2, 1, 1)
            return float(self.pixel_areas(centre)[0, 0])
        a, b, _, d, e, _ = self.transform[:6]
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
        axis, e2 = geodesy.ellipsoid(self.crs)
        scale = geodesy.radians_per_unit(self.crs)
        a, b, _, d, e, f = self.transform[:6]
        rows = window.row_off + np.arange(int(window.height), dtype=np.float64)
        if d == 0:  # latitude = f + e * row: exact zone area between the pixel's top and bottom edges
            top = geodesy.zone_area((f + e * rows) * scale, axis, e2)
            bottom = geodesy.zone_area((f + e * (rows + 1)) * scale, axis, e2)
            return (abs(a) * scale * np.abs(bottom - top))[:, None]
        cols = window.col_off + np.arange(int(window.width), dtype=np.float64)
        latitude = (f + d * (cols[None, :] + 0.5) + e * (rows[:, None] + 0.5)) * scale
        return abs(a * e - b * d) * scale**2 * geodesy.area_density(latitude, axis, e2)

    def profile(self, *, count: int, dtype: str, nodata: float | None = None) -> dict:
        """rasterio creation profile of a tiled GeoTIFF on this grid."""
        return {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": count,
            "dtype": dtype,
            "crs": self.crs,
            "transform": self.transform,
            "nodata": nodata,
        }


@dataclass(frozen=True)
class Scene:
    """Metadata of an opened input raster; pixels are read later with :func:`read_window`.

    ``bands`` are the three 1-based band indexes read as R, G, B (a single band is repeated three times).
    ``stretch`` holds the (low, high) input values mapped to 0 and 255 for each of them, None for uint8 data.
    ``valid_fraction`` is the share of valid pixels in the decimated read (0.0 means an all-nodata scene).
    """

    path: Path
    driver: str
    georef: Georef
    band_count: int
    bands: tuple[int, int, int]
    dtype: str
    nodata: float | None
    alpha_band: int | None
    stretch: tuple[tuple[float, float], ...] | None
    valid_fraction: float

    def __post_init__(self) -> None:
        if len(self.bands) != 3 or not all(1 <= b <= self.band_count for b in self.bands):
            raise ValueError(f"Scene bands must be 3 indexes in 1..{self.band_count}, got {self.bands}")
        if self.stretch is not None and len(self.stretch) != 3:
            raise ValueError(f"Scene stretch must hold 3 (low, high) pairs, got {self.stretch}")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ValueError(f"Scene valid_fraction must be in [0, 1], got {self.valid_fraction}")

    @property
    def width(self) -> int:
        return self.georef.width

    @property
    def height(self) -> int:
        return self.georef.height

    @property
    def crs(self) -> CRS | None:
        """CRS, None when the input is not georeferenced."""
        return self.georef.crs

    @property
    def transform(self) -> Affine:
        return self.georef.transform

    @property
    def res(self) -> tuple[float, float]:
        return self.georef.res

    @property
    def is_projected(self) -> bool:
        return self.georef.is_projected

    @property
    def linear_units(self) -> str | None:
        return self.georef.linear_units

    @property
    def has_alpha(self) -> bool:
        """True when one band is an alpha band (it then masks every other band)."""
        return self.alpha_band is not None

    @property
    def profile(self) -> dict:
        """Profile for writing a single-band uint8 raster on the scene's grid (see :meth:`Georef.profile`)."""
        return self.georef.profile(count=1, dtype="uint8", nodata=255)

    @contextmanager
    def open(self) -> Iterator[DatasetReader]:
        """Open the underlying dataset (to reuse across many :func:`read_window` calls)."""
        with _quiet(), rasterio.open(self.path) as src:
            yield src


def parse_bands(text: str) -> tuple[int, ...]:
    """Parse a ``--bands`` value such as ``"3,2,1"`` into 1-based indexes (validated by :func:`open_scene`)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"--bands {text!r} is not a comma-separated list of integers", hint=_BANDS_HINT
        ) from None


def open_scene(path: str | Path, *, bands: Sequence[int] | None = None) -> Scene:
    """Check an input raster and return its :class:`Scene` (one decimated read, never the full raster).

    Args:
        path: GeoTIFF or any raster GDAL reads; PNG/JPEG without georeferencing get the identity transform
            and ``crs=None``.
        bands: 1-based band indexes read as R, G, B (3 distinct indexes), or one index for a greyscale
            image. Default: the first three non-alpha bands.

    Raises:
        InputFileError: missing file, a folder, or a file GDAL cannot read.
        InputError: fewer than 3 bands without ``bands``, a band index out of range, a repeated band.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"input raster {path} does not exist", hint="check the path")
    if path.is_dir():
        raise InputFileError(f"input raster {path} is a folder", hint="pass a raster file such as a GeoTIFF")
    try:
        with _quiet(), rasterio.open(path) as src:
            return _scene_from_dataset(path, src, bands)
    except RasterioError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputFileError(
            f"cannot read {path} as a raster: {reason}",
            hint="pass a GeoTIFF, PNG or JPEG file and check that it is complete",
        ) from error


def read_window(
    scene: Scene, window: Window, *, src: DatasetReader | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one window as 8-bit RGB and its validity mask.

    Parts of the window beyond the raster edge are padded with zeros and marked invalid, so a tile always
    has the window's full shape. Invalid pixels are 0 in ``rgb``.

    Args:
        scene: from :func:`open_scene`.
        window: integer pixel window; may extend past the edges (or lie fully outside).
        src: an open dataset of ``scene.path`` (from ``scene.open()``) to avoid reopening per tile.

    Returns:
        rgb: (3, h, w) uint8, h = window.height, w = window.width.
        valid: (h, w) bool.
    """
    height, width = int(window.height), int(window.width)
    rgb = np.zeros((3, height, width), dtype=np.uint8)
    valid = np.zeros((height, width), dtype=bool)
    try:
        inner = window.intersection(Window(0, 0, scene.width, scene.height))
    except WindowError:
        return rgb, valid  # entirely outside the raster: all padding
    inner = inner.round_offsets().round_lengths()
    if inner.width < 1 or inner.height < 1:
        return rgb, valid
    row0, col0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
    rows, cols = slice(row0, row0 + int(inner.height)), slice(col0, col0 + int(inner.width))
    if src is None:
        with scene.open() as opened:
            data, mask = _read_bands(opened, scene.bands, window=inner)
    else:
        data, mask = _read_bands(src, scene.bands, window=inner)
    rgb[:, rows, cols] = _to_uint8(data, mask, scene.stretch)
    valid[rows, cols] = mask
    return rgb, valid


def read_overview(scene: Scene, *, max_size: int = STATS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Read the whole scene decimated (nearest) so its longer side is at most ``max_size`` (for previews).

    Returns:
        rgb: (3, h, w) uint8 with the scene's stretch; valid: (h, w) bool.
    """
    with scene.open() as src:
        data, mask = _read_bands(
            src, scene.bands, out_shape=_decimated_shape(scene.height, scene.width, max_size)
        )
    return _to_uint8(data, mask, scene.stretch), mask


def scene_is_empty(scene: Scene) -> bool:
    """True when no pixel of the decimated read is valid (the scene is entirely nodata).

    Decided from the ~1024² decimated mask, so a valid area thinner than about 1/1024 of the scene's longer
    side can be missed; such a scene yields almost nothing anyway.
    """
    return scene.valid_fraction == 0.0


def _scene_from_dataset(path: Path, src: DatasetReader, bands: Sequence[int] | None) -> Scene:
    alpha_bands = [i for i, interp in enumerate(src.colorinterp, start=1) if interp == ColorInterp.alpha]
    alpha_band = alpha_bands[0] if alpha_bands else None
    selected = _select_bands(path, src.count, alpha_band, bands)
    dtype = src.dtypes[selected[0] - 1]
    data, mask = _read_bands(src, selected, out_shape=_decimated_shape(src.height, src.width, STATS_SIZE))
    stretch = None if dtype == "uint8" else _percentile_stretch(data, mask)
    crs = src.crs if src.crs else None
    return Scene(
        path=path,
        driver=src.driver,
        georef=Georef(width=src.width, height=src.height, crs=crs, transform=src.transform),
        band_count=src.count,
        bands=selected,
        dtype=dtype,
        nodata=src.nodata,
        alpha_band=alpha_band,
        stretch=stretch,
        valid_fraction=float(mask.mean()),
    )


def _select_bands(
    path: Path, count: int, alpha_band: int | None, bands: Sequence[int] | None
) -> tuple[int, int, int]:
    """Resolve the user's band choice (or the default: first three non-alpha bands) to 3 indexes."""
    if bands is None:
        colour = [i for i in range(1, count + 1) if i != alpha_band]
        if len(colour) < 3:
            raise InputError(
                f"{path} has {len(colour)} colour band(s) but RGB needs 3",
                hint="pass --bands to choose them, e.g. --bands 1 to read a single band as grey",
            )
        return colour[0], colour[1], colour[2]
    bands = tuple(bands)
    if len(bands) not in (1, 3):
        raise InputError(f"--bands needs 1 or 3 band indexes, got {len(bands)}: {bands}", hint=_BANDS_HINT)
    for band in bands:
        if not 1 <= band <= count:
            raise InputError(
                f"band {band} is out of range: {path} has bands 1..{count}",
                hint=f"band indexes are 1-based like GDAL's; pass --bands with indexes in 1..{count}",
            )
    repeated = sorted({b for b in bands if bands.count(b) > 1})
    if repeated:
        raise InputError(f"band {repeated[0]} is listed twice in --bands {bands}", hint=_BANDS_HINT)
    return (bands[0],) * 3 if len(bands) == 1 else (bands[0], bands[1], bands[2])


def _read_bands(src: DatasetReader, bands: Sequence[int], **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Read bands and their validity: ((3, h, w) source dtype, (h, w) bool). ``kwargs``: window or out_shape."""
    indexes = list(bands)
    if "out_shape" in kwargs:
        kwargs["out_shape"] = (len(indexes), *kwargs["out_shape"])
        kwargs["resampling"] = Resampling.nearest
    data = src.read(indexes, **kwargs)
    valid = (src.read_masks(indexes, **kwargs) > 0).any(axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def _decimated_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a read whose longer side is at most ``max_size``, keeping the aspect ratio."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _percentile_stretch(data: np.ndarray, valid: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Per band (low, high) = 2nd and 98th percentiles of the valid pixels of data (3, h, w)."""
    low_q, high_q = STRETCH_PERCENTILES
    stretch = []
    for band in data:
        values = band[valid].astype(np.float64)
        if values.size == 0:
            stretch.append((0.0, 1.0))  # all nodata: any range will do, nothing valid gets drawn
            continue
        low, high = np.percentile(values, [low_q, high_q])
        stretch.append((float(low), float(max(high, low + 1e-6))))  # a constant band must not divide by 0
    return tuple(stretch)


def _to_uint8(
    data: np.ndarray, valid: np.ndarray, stretch: tuple[tuple[float, float], ...] | None
) -> np.ndarray:
    """(3, h, w) source values -> (3, h, w) uint8: as is for uint8, else linearly mapped low..high -> 0..255."""
    if stretch is None:
        rgb = data.astype(np.uint8, copy=True)
    else:
        low = np.array([s[0] for s in stretch], dtype=np.float32)[:, None, None]
        high = np.array([s[1] for s in stretch], dtype=np.float32)[:, None, None]
        scaled = (data.astype(np.float32) - low) * (255.0 / (high - low))
        rgb = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 255.0)).astype(np.uint8)
    rgb[:, ~valid] = 0
    return rgb


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence NotGeoreferencedWarning: plain PNG/JPEG inputs are expected and get the identity transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


__all__ = [
    "STATS_SIZE",
    "STRETCH_PERCENTILES",
    "Georef",
    "Scene",
    "open_scene",
    "parse_bands",
    "read_overview",
    "read_window",
    "scene_is_empty",
]
