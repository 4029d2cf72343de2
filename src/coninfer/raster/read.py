"""Open an input scene once, then read it window by window as 8-bit RGB plus a validity mask.

``open_scene`` checks the input and the band choice, and reads one bounded sample of the scene
(:mod:`coninfer.raster.sample`: from overviews, a decimated read, or blocks spread over the scene) to learn
what needs the whole scene: the per-band stretch for non-uint8 data, fill values of untagged float data, and
whether any pixel is valid at all. uint8 data with no mask needs neither, and is not read at open. Nothing
else reads more than one window.

Inputs: local files, ``/vsi...`` paths, URLs (read through GDAL's virtual file systems, window by window) and
subdataset names such as ``GTIFF_DIR:2:scene.tif`` (:mod:`coninfer.raster.source`). Georeferencing in any
form GDAL knows is kept (:mod:`coninfer.raster.georef`). Validity follows GDAL's mask bands: a pixel is valid
when ANY selected band's mask is non-zero (:mod:`coninfer.raster.bands`). A paletted band is expanded to RGB
through its colour table.

A rasterio dataset is not thread-safe: read each scene from one thread, or open one dataset per thread.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window, WindowError

from coninfer.errors import InputError
from coninfer.raster import source
from coninfer.raster.bands import BandReader, check_nodata, palette_table
from coninfer.raster.georef import Georef
from coninfer.raster.sample import STATS_SIZE, decimated_read, sample_scene
from coninfer.raster.source import GDAL_CACHE_BYTES, gdal_cache_env
from coninfer.raster.stretch import (
    STRETCH_PERCENTILES,
    detect_fills,
    format_value,
    percentile_stretch,
    to_uint8,
)

logger = logging.getLogger(__name__)

_BANDS_HINT = "pass --bands with 3 distinct 1-based band indexes (e.g. --bands 3,2,1) or one band (--bands 1)"


@dataclass(frozen=True)
class Scene:
    """Metadata of an opened input raster; pixels are read later with :func:`read_window`.

    ``path`` is a ``Path`` for local files, the ``str`` GDAL opens otherwise (URL, /vsi path, subdataset).
    ``bands`` are the three 1-based band indexes read as R, G, B (a single band is repeated three times).
    ``stretch`` holds the (low, high) input values mapped to 0 and 255 for each of them, None for uint8 data.
    ``valid_fraction`` is the share of valid pixels in the statistics sample (0.0: an all-nodata scene).
    ``nodata`` is the effective nodata value: the file's, or the one passed to :func:`open_scene`
    (``nodata_explicit``). ``expanded_palette``: one paletted band read as RGB through its colour table.
    ``fill_values``: untagged fill values found in the sample (left out of the stretch, still valid).
    ``stats_source``: how the sample was read ("overviews", "decimated", "blocks", or "none": not needed).
    ``pages``: number of pages (TIFF directories) of the file; page 1 is read unless the path names one.
    """

    path: Path | str
    driver: str
    georef: Georef
    band_count: int
    bands: tuple[int, int, int]
    dtype: str
    nodata: float | None
    alpha_band: int | None
    stretch: tuple[tuple[float, float], ...] | None
    valid_fraction: float
    nodata_explicit: bool = False
    expanded_palette: bool = False
    fill_values: tuple[float, ...] = ()
    stats_source: str = "decimated"
    pages: int = 1
    masked: bool = True
    """False when no pixel inside the raster can be invalid (no mask, nodata, alpha, float data or transparent
    palette entry: :meth:`BandReader.reads_masks`), so validity needs no read (:func:`window_validity`)."""
    palette: np.ndarray | None = field(default=None, compare=False, repr=False)
    """(N, 4) uint8 RGBA colour table of the paletted band when ``expanded_palette``."""

    def __post_init__(self) -> None:
        if len(self.bands) != 3 or not all(1 <= b <= self.band_count for b in self.bands):
            raise ValueError(f"Scene bands must be 3 indexes in 1..{self.band_count}, got {self.bands}")
        if self.stretch is not None and len(self.stretch) != 3:
            raise ValueError(f"Scene stretch must hold 3 (low, high) pairs, got {self.stretch}")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ValueError(f"Scene valid_fraction must be in [0, 1], got {self.valid_fraction}")
        if self.expanded_palette != (self.palette is not None):
            raise ValueError("Scene expanded_palette must be True exactly when a palette is given")

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

    @property
    def reader(self) -> BandReader:
        """How :func:`read_window` reads the scene's bands and validity."""
        return BandReader(self.bands, self.nodata if self.nodata_explicit else None, self.palette)

    @contextmanager
    def open(self) -> Iterator[DatasetReader]:
        """Open the underlying dataset (to reuse across many :func:`read_window` calls); remote paths get
        :data:`~coninfer.raster.source.REMOTE_OPTIONS` while it is open."""
        with _quiet(), source.gdal_env(self.path), rasterio.open(self.path) as src:
            yield src


def parse_bands(text: str) -> tuple[int, ...]:
    """Parse a ``--bands`` value such as ``"3,2,1"`` into 1-based indexes (validated by :func:`open_scene`)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"--bands {text!r} is not a comma-separated list of integers", hint=_BANDS_HINT
        ) from None


def open_scene(
    path: str | Path, *, bands: Sequence[int] | None = None, nodata: float | None = None
) -> Scene:
    """Check an input raster and return its :class:`Scene` (one bounded sample, never the full raster).

    Args:
        path: GeoTIFF or any raster GDAL reads (PNG/JPEG without georeferencing get the identity transform and
            ``crs=None``); a URL (``https://``, ``s3://``, ``gs://``...), a ``/vsi...`` path or a subdataset
            name such as ``GTIFF_DIR:2:scene.tif``.
        bands: 1-based band indexes read as R, G, B (3 distinct indexes), or one index for a greyscale
            image (a paletted band is expanded through its colour table). Default: the first three non-alpha
            bands, or the one band of a paletted raster.
        nodata: nodata value of the selected bands, replacing the file's (``--nodata``); NaN is allowed.

    Raises:
        InputFileError: missing file, a folder, a file GDAL cannot read, an unreachable URL, a server without
            HTTP range requests.
        InputError: fewer than 3 bands without ``bands``, a band index out of range, a repeated band, a
            paletted band among three, a nodata value the band type cannot hold.
    """
    path = source.source_path(path)
    try:
        with _quiet(), source.gdal_env(path), rasterio.open(path) as src:
            return _scene_from_dataset(path, src, bands, nodata)
    except RasterioError as error:
        raise source.open_error(path, error) from error


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
    inside = _inside(scene, window)
    if inside is None:
        return rgb, valid  # entirely outside the raster: all padding
    inner, rows, cols = inside
    if src is None:
        with scene.open() as opened:
            data, mask = scene.reader.read(opened, window=inner)
    else:
        data, mask = scene.reader.read(src, window=inner)
    rgb[:, rows, cols] = to_uint8(data, mask, scene.stretch)
    valid[rows, cols] = mask
    return rgb, valid


def window_validity(scene: Scene, window: Window) -> np.ndarray:
    """:func:`read_window`'s validity of a scene without masks (``not scene.masked``), read from no file: True
    inside the raster, False on the padding past its edges."""
    if scene.masked:
        raise ValueError(f"{scene.path} has masks or nodata: its validity needs read_window")
    valid = np.zeros((int(window.height), int(window.width)), dtype=bool)
    inside = _inside(scene, window)
    if inside is not None:
        valid[inside[1:]] = True
    return valid


def _inside(scene: Scene, window: Window) -> tuple[Window, slice, slice] | None:
    """The part of ``window`` inside the raster, and its rows and columns within the window (None: no part)."""
    try:
        inner = window.intersection(Window(0, 0, scene.width, scene.height))
    except WindowError:
        return None
    inner = inner.round_offsets().round_lengths()
    if inner.width < 1 or inner.height < 1:
        return None
    row0, col0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
    return inner, slice(row0, row0 + int(inner.height)), slice(col0, col0 + int(inner.width))


def read_overview(scene: Scene, *, max_size: int = STATS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Read the whole scene decimated (nearest) so its longer side is at most ``max_size`` (for previews).

    Returns:
        rgb: (3, h, w) uint8 with the scene's stretch; valid: (h, w) bool.
    """
    with scene.open() as src:
        data, mask = decimated_read(src, scene.reader, max_size)
    return to_uint8(data, mask, scene.stretch), mask


def scene_is_empty(scene: Scene) -> bool:
    """True when no pixel of the statistics sample is valid (the scene is entirely nodata).

    A sample of blocks that finds no valid pixel is checked again with a decimated read of the whole scene,
    so only a valid area thinner than about 1/1024 of the scene's longer side can be missed.
    """
    return scene.valid_fraction == 0.0


def _scene_from_dataset(
    path: Path | str, src: DatasetReader, bands: Sequence[int] | None, nodata: float | None
) -> Scene:
    pages = _page_count(path, src)
    alpha_bands = [i for i, interp in enumerate(src.colorinterp, start=1) if interp == ColorInterp.alpha]
    alpha_band = alpha_bands[0] if alpha_bands else None
    selected = _select_bands(path, src, alpha_band, bands)
    dtype = src.dtypes[selected[0] - 1]
    palette = palette_table(src, selected[0]) if len(set(selected)) == 1 else None
    if nodata is not None:
        nodata = check_nodata(nodata, dtype)
    reader = BandReader(selected, nodata, palette)
    stretch, fills, valid_fraction, stats_source = None, (), 1.0, "none"
    needs_stretch = dtype != "uint8" and palette is None
    masked = reader.reads_masks(src)
    if needs_stretch or masked:
        sample = sample_scene(src, reader)
        stats_source, valid_fraction = sample.source, float(sample.valid.mean())
        if needs_stretch:
            fills = tuple(value for value, _ in _warn_fills(path, sample.data, sample.valid, dtype))
            stretch = percentile_stretch(sample.data, sample.valid, ignore=fills)
    return Scene(
        path=path,
        driver=src.driver,
        georef=_georef(src),
        band_count=src.count,
        bands=selected,
        dtype=dtype,
        nodata=src.nodata if nodata is None else nodata,
        alpha_band=alpha_band,
        stretch=stretch,
        valid_fraction=valid_fraction,
        nodata_explicit=nodata is not None,
        expanded_palette=palette is not None,
        fill_values=fills,
        stats_source=stats_source,
        pages=pages,
        masked=masked,
        palette=palette,
    )


def _georef(src: DatasetReader) -> Georef:
    """The dataset's georeferencing: geotransform and CRS, else GCPs and their CRS; RPCs when present."""
    gcps, gcp_crs = src.gcps
    has_geotransform = not src.transform.is_identity
    crs = src.crs if src.crs else None
    if not has_geotransform and len(gcps) >= 3:
        return Georef(src.width, src.height, gcp_crs or crs, src.transform, tuple(gcps), src.rpcs)
    return Georef(src.width, src.height, crs, src.transform, (), src.rpcs)


def _page_count(path: Path | str, src: DatasetReader) -> int:
    """Pages of a multi-page TIFF (warned about: page 1 is read), 1 otherwise. A file whose bands all live in
    subdatasets (NetCDF, HDF) is an error naming one to pass."""
    subdatasets = src.subdatasets
    if src.count == 0:
        example = subdatasets[0] if subdatasets else None
        raise InputError(
            f"{path} has no raster bands of its own" + (f" but {len(subdatasets)} subdatasets" if example else ""),
            hint=f"pass one subdataset as the input, e.g. {example}" if example else "pass a raster file",
        )
    pages = [name for name in subdatasets if name.startswith("GTIFF_DIR:")]
    if len(pages) > 1:
        logger.warning(
            "%s holds %d pages (TIFF directories); reading page 1: pass GTIFF_DIR:N:%s as the input to read "
            "page N", path, len(pages), path,
        )
    return max(1, len(pages))


def _select_bands(
    path: Path | str, src: DatasetReader, alpha_band: int | None, bands: Sequence[int] | None
) -> tuple[int, int, int]:
    """Resolve the user's band choice (or the default: first three non-alpha bands, or the one paletted
    band) to 3 indexes."""
    count = src.count
    if bands is None:
        colour = [i for i in range(1, count + 1) if i != alpha_band]
        if len(colour) == 1 and src.colorinterp[colour[0] - 1] == ColorInterp.palette:
            return colour[0], colour[0], colour[0]  # expanded through its colour table
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
    paletted = [b for b in bands if src.colorinterp[b - 1] == ColorInterp.palette]
    if len(bands) == 3 and paletted:
        raise InputError(
            f"band {paletted[0]} of {path} is paletted: its values are colour-table indexes, not intensities",
            hint=f"pass --bands {paletted[0]} alone to read it as RGB through its colour table",
        )
    return (bands[0],) * 3 if len(bands) == 1 else (bands[0], bands[1], bands[2])


def _warn_fills(path, data: np.ndarray, valid: np.ndarray, dtype: str) -> tuple[tuple[float, float], ...]:
    """Detect untagged fill values in the sample and warn once per value (one line, naming --nodata)."""
    fills = detect_fills(data, valid)
    for value, share in fills:
        text = format_value(value, dtype)
        logger.warning(
            "%s: %s (%.1f%% of the sampled pixels) looks like an untagged fill value; the stretch ignores it, "
            "pass --nodata %s to mark those pixels as nodata", path, text, 100 * share, text,
        )
    return fills


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence NotGeoreferencedWarning: plain PNG/JPEG inputs are expected and get the identity transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


__all__ = [
    "GDAL_CACHE_BYTES",
    "STATS_SIZE",
    "STRETCH_PERCENTILES",
    "Georef",
    "Scene",
    "gdal_cache_env",
    "open_scene",
    "parse_bands",
    "read_overview",
    "read_window",
    "scene_is_empty",
]
