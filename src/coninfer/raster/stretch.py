"""Map non-8-bit bands to 0..255, and spot the fill values of float rasters that declare no nodata.

The stretch maps each band's 2nd..98th percentile (of the valid, finite, non-fill samples) linearly to 0..255.
Float rasters often mark missing data with a classic fill value without tagging it as nodata; left in, one
such value pins a percentile and flattens the image. :func:`detect_fills` flags in a band's sample:

- ±3.4028235e38 (float32 max), ±3.4e38 and ±1e38 wherever they occur (no physical quantity reaches them);
- -9999 when it is the band's minimum and holds at least :data:`DOMINANT_SHARE` of the valid samples.

Flagged values are left out of the stretch; the caller warns and points at ``--nodata`` to mask them.
"""

from __future__ import annotations

import numpy as np

STRETCH_PERCENTILES = (2.0, 98.0)
"""Percentiles of the valid pixels of each band mapped to 0 and 255 for data that is not uint8."""

EXTREME_FILLS = (3.4028234663852886e38, -3.4028234663852886e38, 3.4e38, -3.4e38, 1e38, -1e38)
"""Fill values flagged wherever they occur in a float band."""

MINIMUM_FILLS = (-9999.0,)
"""Fill values flagged when they are a band's minimum and frequent (see :data:`DOMINANT_SHARE`)."""

DOMINANT_SHARE = 0.01
"""Share of a band's valid samples a :data:`MINIMUM_FILLS` value must hold to be flagged."""


def detect_fills(data: np.ndarray, valid: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Fill values in a float sample: ((value, share of the valid samples), ...), each value once.

    Args:
        data: (bands, n) float samples in the band dtype (values compared after a cast to it).
        valid: (n,) bool; only valid samples count.
    """
    if not np.issubdtype(data.dtype, np.floating) or not valid.any():
        return ()
    found: dict[float, float] = {}
    for band in data:
        values = band[valid]
        for candidate in EXTREME_FILLS + MINIMUM_FILLS:
            cast = data.dtype.type(candidate)
            if not np.isfinite(cast) or float(cast) in found:
                continue
            share = float(np.count_nonzero(values == cast)) / values.size
            if share == 0.0:
                continue
            if candidate in MINIMUM_FILLS and (share < DOMINANT_SHARE or np.nanmin(values) < cast):
                continue
            found[float(cast)] = share
    return tuple(found.items())


def format_value(value: float, dtype: str) -> str:
    """Shortest text of ``value`` that reads back as the same ``dtype`` value (for messages and --nodata)."""
    if np.issubdtype(np.dtype(dtype), np.floating):
        text = str(np.dtype(dtype).type(value))
        return text[:-2] if text.endswith(".0") else text
    return str(int(value))


def percentile_stretch(
    data: np.ndarray, valid: np.ndarray, ignore: tuple[float, ...] = ()
) -> tuple[tuple[float, float], ...]:
    """Per band (low, high) = 2nd and 98th percentiles of its valid, finite samples not in ``ignore``.

    Args:
        data: (bands, n) samples; valid: (n,) bool.
    """
    low_q, high_q = STRETCH_PERCENTILES
    stretch = []
    for band in data:
        keep = valid.copy()
        if np.issubdtype(band.dtype, np.floating):
            keep &= np.isfinite(band)
        if ignore:
            keep &= ~np.isin(band, np.asarray(ignore, dtype=band.dtype))
        values = band[keep].astype(np.float64)
        if values.size == 0:
            stretch.append((0.0, 1.0))  # nothing valid: any range will do, nothing valid gets drawn
            continue
        low, high = np.percentile(values, [low_q, high_q])
        stretch.append((float(low), float(max(high, low + 1e-6))))  # a constant band must not divide by 0
    return tuple(stretch)


def to_uint8(data: np.ndarray, valid: np.ndarray, stretch: tuple[tuple[float, float], ...] | None) -> np.ndarray:
    """(3, h, w) source values -> (3, h, w) uint8: as is for uint8, else linearly mapped low..high -> 0..255
    (clipped; NaN -> 0). Invalid pixels are 0."""
    if stretch is None:
        rgb = data.astype(np.uint8, copy=True)
    else:
        low = np.array([s[0] for s in stretch], dtype=np.float64)[:, None, None]
        high = np.array([s[1] for s in stretch], dtype=np.float64)[:, None, None]
        scale = (255.0 / (high - low)).astype(np.float32)  # in float64: a constant band's 1e-6 range stays > 0
        with np.errstate(over="ignore", invalid="ignore"):  # fill values such as 3.4e38 overflow to inf
            scaled = (data.astype(np.float32) - low.astype(np.float32)) * scale
        rgb = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 255.0)).astype(np.uint8)
    rgb[:, ~valid] = 0
    return rgb


__all__ = [
    "DOMINANT_SHARE",
    "EXTREME_FILLS",
    "MINIMUM_FILLS",
    "STRETCH_PERCENTILES",
    "detect_fills",
    "format_value",
    "percentile_stretch",
    "to_uint8",
]
