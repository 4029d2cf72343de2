"""Read the three bands of a scene and their validity, in any window or decimated shape.

Validity follows GDAL's mask bands (``read_masks``), so a nodata value, an alpha band and an internal or
``.msk`` mask all work the same way: a pixel is valid when ANY selected band's mask is non-zero (GDAL's
dataset-mask rule, so a dark pixel with one channel equal to nodata stays valid). Float data also needs
finite values in every band. A nodata value given explicitly (``--nodata``) replaces the file's nodata:
each band's mask is then ``value != nodata`` (``not NaN`` for NaN), still combined with an alpha band or an
internal mask when the file has one. Bands whose GDAL mask is "all valid" are not read for masks at all.

A paletted band (one band with a colour table) is expanded to RGB through its table; entries with alpha 0
are invalid, indexes beyond the table are opaque black (GDAL's expansion of a missing entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.io import DatasetReader

from coninfer.errors import InputError


@dataclass(frozen=True)
class BandReader:
    """How a scene's pixels are read: ``bands`` (3 1-based indexes read as R, G, B), an explicit ``nodata``
    overriding the file's (None: the file's masks), and the (N, 4) uint8 RGBA ``palette`` of a paletted band
    (None: no expansion)."""

    bands: tuple[int, int, int]
    nodata: float | None = None
    palette: np.ndarray | None = field(default=None, compare=False, repr=False)

    def reads_masks(self, src: DatasetReader) -> bool:
        """True when validity needs a read: a mask that is not "all valid", an explicit nodata, float data
        (finiteness) or a palette with transparent entries."""
        if self.nodata is not None or np.issubdtype(np.dtype(src.dtypes[self.bands[0] - 1]), np.floating):
            return True
        if self.palette is not None and (self.palette[:, 3] == 0).any():
            return True
        return any(src.mask_flag_enums[b - 1] != [MaskFlags.all_valid] for b in set(self.bands))

    def read(self, src: DatasetReader, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """Bands and validity: ((3, h, w) source dtype, or uint8 for a palette; (h, w) bool).

        ``kwargs``: ``window`` and/or ``out_shape`` (h, w); a decimated read takes the nearest pixel (and uses
        the file's overviews when it has them).
        """
        unique = list(dict.fromkeys(self.bands))  # a grey scene reads its one band once
        if "out_shape" in kwargs:
            kwargs["out_shape"] = (len(unique), *kwargs["out_shape"])
            kwargs["resampling"] = Resampling.nearest
        data = src.read(unique, **kwargs)
        band_valid = self._band_masks(src, unique, data, kwargs)
        valid = band_valid.any(axis=0)  # GDAL's dataset-mask rule: valid where any band is
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        if self.palette is not None:
            rgba = np.take(self.palette, data[0], axis=0, mode="clip")  # (h, w) -> (h, w, 4)
            valid &= rgba[..., 3] > 0
            return np.ascontiguousarray(np.moveaxis(rgba[..., :3], -1, 0)), valid
        return data[[unique.index(b) for b in self.bands]], valid

    def _band_masks(self, src: DatasetReader, unique: list[int], data: np.ndarray, kwargs: dict) -> np.ndarray:
        """(bands, h, w) bool validity of each band of ``unique``, read only where a mask exists."""
        shape = data.shape
        masked = [b for b in unique if src.mask_flag_enums[b - 1] != [MaskFlags.all_valid]]
        if self.nodata is not None:  # the file's nodata is replaced; alpha and internal masks still apply
            masked = [b for b in masked if MaskFlags.nodata not in src.mask_flag_enums[b - 1]]
        valid = np.ones(shape, dtype=bool)
        if masked:
            if "out_shape" in kwargs:
                kwargs = {**kwargs, "out_shape": (len(masked), *shape[1:])}
            masks = src.read_masks(masked, **kwargs)
            for mask, band in zip(masks, masked, strict=True):
                valid[unique.index(band)] = mask > 0
        if self.nodata is not None:
            value = data.dtype.type(self.nodata)
            valid &= ~np.isnan(data) if np.isnan(value) else data != value
        return valid


def palette_table(src: DatasetReader, band: int) -> np.ndarray | None:
    """(N, 4) uint8 RGBA lookup table of a paletted band (missing entries opaque black), None otherwise."""
    if src.colorinterp[band - 1] != ColorInterp.palette:
        return None
    try:
        colormap = src.colormap(band)
    except ValueError:
        return None  # tagged as paletted but without a table: read the indexes as grey
    dtype = src.dtypes[band - 1]
    size = 256 if dtype == "uint8" else max(max(colormap) + 1, 65536 if dtype == "uint16" else 0)
    table = np.zeros((size, 4), dtype=np.uint8)
    table[:, 3] = 255
    for index, rgba in colormap.items():
        table[index] = rgba
    return table


def check_nodata(nodata: float, dtype: str) -> float:
    """``nodata`` as a value of ``dtype``; an InputError naming --nodata when the type cannot hold it."""
    kind = np.dtype(dtype)
    nodata = float(nodata)
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        if not (math.isfinite(nodata) and nodata == int(nodata) and info.min <= nodata <= info.max):
            raise InputError(
                f"nodata {nodata:g} is not a {dtype} value (integers {info.min}..{info.max})",
                hint=f"pass --nodata with an integer in {info.min}..{info.max}",
            )
        return float(int(nodata))
    cast = float(kind.type(nodata))
    if math.isinf(cast) and math.isfinite(nodata):
        raise InputError(f"nodata {nodata:g} overflows {dtype}", hint=f"pass --nodata with a {dtype} value")
    return cast


__all__ = ["BandReader", "check_nodata", "palette_table"]
