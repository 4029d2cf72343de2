"""Synthetic rasters for the raster tests, written on demand into a test's tmp_path (seeded, tiny).

All georeferenced ones use EPSG:25832 (metres) at 0.5 m with an origin near Köln, and sizes that are not
square and not multiples of the test tile sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp, Resampling
from rasterio.rpc import RPC

CRS = "EPSG:25832"
TRANSFORM = Affine(0.5, 0.0, 346000.0, 0.0, -0.5, 5648000.0)
WIDTH, HEIGHT = 75, 53
NODATA_COLS = 10
"""The uint16 raster's first NODATA_COLS columns are nodata; the RGBA and masked rasters' too."""


def _profile(count: int, dtype: str, **extra) -> dict:
    profile = {
        "driver": "GTiff",
        "width": WIDTH,
        "height": HEIGHT,
        "count": count,
        "dtype": dtype,
        "crs": CRS,
        "transform": TRANSFORM,
    }
    return {**profile, **extra}


def rgb_uint8(path: Path, *, seed: int = 0) -> np.ndarray:
    """3-band uint8 GeoTIFF without nodata; returns its (3, H, W) pixels."""
    data = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8)
    with rasterio.open(path, "w", **_profile(3, "uint8")) as dst:
        dst.write(data)
    return data


def multispectral_uint16(path: Path, *, count: int = 4, nodata: int = 0, seed: int = 0) -> np.ndarray:
    """``count``-band uint16 GeoTIFF with nodata in the first NODATA_COLS columns; band b (1-based) holds
    values around 1000 * b so band order is visible after the stretch. Returns (count, H, W)."""
    rng = np.random.default_rng(seed)
    data = np.stack([rng.integers(1000 * b, 1000 * b + 500, (HEIGHT, WIDTH)) for b in range(1, count + 1)])
    data = data.astype(np.uint16)
    data[:, :, :NODATA_COLS] = nodata
    with rasterio.open(path, "w", **_profile(count, "uint16", nodata=nodata)) as dst:
        dst.write(data)
    return data


def rgba_uint8(path: Path, *, seed: int = 0) -> np.ndarray:
    """4-band uint8 GeoTIFF whose band 4 is alpha (0 in the first NODATA_COLS columns). Returns (4, H, W)."""
    data = np.random.default_rng(seed).integers(1, 256, (4, HEIGHT, WIDTH), dtype=np.uint8)
    data[3] = 255
    data[3, :, :NODATA_COLS] = 0
    with rasterio.open(path, "w", **_profile(4, "uint8", photometric="RGB", alpha="YES")) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return data


def masked_uint8(path: Path, *, seed: int = 0) -> np.ndarray:
    """3-band uint8 GeoTIFF with an internal dataset mask (invalid: first NODATA_COLS columns)."""
    data = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8)
    mask = np.full((HEIGHT, WIDTH), 255, np.uint8)
    mask[:, :NODATA_COLS] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **_profile(3, "uint8")) as dst:
        dst.write(data)
        dst.write_mask(mask)
    return data


def single_band(
    path: Path, *, dtype: str = "uint8", seed: int = 0, nodata: float | None = None
) -> np.ndarray:
    """1-band GeoTIFF; returns (1, H, W)."""
    data = np.random.default_rng(seed).integers(0, 200, (1, HEIGHT, WIDTH)).astype(dtype)
    with rasterio.open(path, "w", **_profile(1, dtype, nodata=nodata)) as dst:
        dst.write(data)
    return data


def nodata_only(path: Path) -> None:
    """3-band uint16 GeoTIFF in which every pixel is nodata."""
    with rasterio.open(path, "w", **_profile(3, "uint16", nodata=0)) as dst:
        dst.write(np.zeros((3, HEIGHT, WIDTH), np.uint16))


def plain_png(path: Path, *, rgba: bool = False, seed: int = 0) -> np.ndarray:
    """PNG without georeferencing (RGB, or RGBA with alpha 0 in the first NODATA_COLS columns).
    Returns (bands, H, W)."""
    data = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 4 if rgba else 3), dtype=np.uint8)
    if rgba:
        data[..., 3] = 255
        data[:, :NODATA_COLS, 3] = 0
    Image.fromarray(data, "RGBA" if rgba else "RGB").save(path)
    return np.moveaxis(data, -1, 0)


GCPS = (  # the corners of TRANSFORM's grid: from_gcps gives TRANSFORM back
    (0, 0, 346000.0, 5648000.0),
    (0, WIDTH, 346000.0 + 0.5 * WIDTH, 5648000.0),
    (HEIGHT, 0, 346000.0, 5648000.0 - 0.5 * HEIGHT),
    (HEIGHT, WIDTH, 346000.0 + 0.5 * WIDTH, 5648000.0 - 0.5 * HEIGHT),
)
"""(row, col, x, y) of the GCP raster's control points, in EPSG:25832."""


def gcp_uint8(path: Path, *, seed: int = 0) -> np.ndarray:
    """3-band uint8 GeoTIFF placed by 4 GCPs (EPSG:25832), no geotransform. Returns (3, H, W)."""
    gcps = [GroundControlPoint(row=r, col=c, x=x, y=y, id=str(i)) for i, (r, c, x, y) in enumerate(GCPS)]
    data = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8)
    profile = {k: v for k, v in _profile(3, "uint8").items() if k != "transform"}
    with rasterio.open(path, "w", **{**profile, "gcps": gcps}) as dst:
        dst.write(data)
    return data


RPCS = RPC(
    height_off=100.0, height_scale=50.0, lat_off=50.94, lat_scale=0.01, long_off=6.96, long_scale=0.01,
    line_off=26.0, line_scale=27.0, samp_off=37.0, samp_scale=38.0,
    line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17, line_den_coeff=[1.0] + [0.0] * 19,
    samp_num_coeff=[0.0, 1.0] + [0.0] * 18, samp_den_coeff=[1.0] + [0.0] * 19,
)
"""Affine RPCs (lon/lat around Köln) for the RPC raster."""


def rpc_uint8(path: Path, *, seed: int = 0) -> None:
    """3-band uint8 GeoTIFF with RPCs only (no CRS, no geotransform, no GCPs)."""
    data = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8)
    profile = {k: v for k, v in _profile(3, "uint8").items() if k not in ("transform", "crs")}
    with rasterio.open(path, "w", **{**profile, "rpcs": RPCS}) as dst:
        dst.write(data)


PALETTE = {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255), 3: (0, 0, 0, 0)}
"""Colour table of the paletted raster; index 3 is transparent."""


def paletted(path: Path, *, seed: int = 0) -> np.ndarray:
    """1-band uint8 raster of indexes 0..3 with the PALETTE colour table. A ``.png`` keeps index 3
    transparent (tRNS); a GeoTIFF colour table has no alpha, so there every entry is opaque. Returns the
    (H, W) indexes."""
    index = np.random.default_rng(seed).integers(0, 4, (HEIGHT, WIDTH), dtype=np.uint8)
    if path.suffix == ".png":
        image = Image.fromarray(index, "P")
        image.putpalette([channel for i in range(4) for channel in PALETTE[i][:3]])
        image.save(path, transparency=3)
        return index
    with rasterio.open(path, "w", **_profile(1, "uint8", photometric="palette")) as dst:
        dst.write(index, 1)
        dst.write_colormap(1, PALETTE)
    return index


def float_with_fill(path: Path, fill: float, *, count: int = 3, seed: int = 0) -> np.ndarray:
    """``count``-band float32 GeoTIFF without a nodata tag whose first NODATA_COLS columns hold ``fill``;
    values elsewhere in 100..200. Returns (count, H, W)."""
    data = np.random.default_rng(seed).uniform(100.0, 200.0, (count, HEIGHT, WIDTH)).astype(np.float32)
    data[:, :, :NODATA_COLS] = fill
    with rasterio.open(path, "w", **_profile(count, "float32")) as dst:
        dst.write(data)
    return data


def multipage(path: Path, *, pages: int = 3) -> None:
    """Multi-page RGB TIFF (no georeferencing); page p (1-based) is filled with 50 * p."""
    images = [Image.fromarray(np.full((HEIGHT, WIDTH, 3), 50 * p, np.uint8)) for p in range(1, pages + 1)]
    images[0].save(path, save_all=True, append_images=images[1:])


def tiled(
    path: Path, data: np.ndarray, *, block: int = 64, nodata: float | None = None, overviews: bool = False
) -> None:
    """GeoTIFF of ``data`` (bands, h, w), tiled in ``block``² deflate blocks, optionally with overviews."""
    count, height, width = data.shape
    profile = {**_profile(count, str(data.dtype), nodata=nodata), "width": width, "height": height}
    profile.update(tiled=True, blockxsize=block, blockysize=block, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if overviews:
            dst.build_overviews([2, 4, 8], Resampling.nearest)


def palette_stack_vrt(path: Path, source: Path) -> None:
    """3-band VRT over band 1 of ``source``: band 1 keeps its colour table, bands 2 and 3 are grey."""
    entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for r, g, b, a in PALETTE.values())
    bands = []
    for band in (1, 2, 3):
        colour = f"<ColorInterp>Palette</ColorInterp><ColorTable>{entries}</ColorTable>" if band == 1 else ""
        bands.append(
            f'<VRTRasterBand dataType="Byte" band="{band}">{colour}<SimpleSource>'
            f"<SourceFilename>{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        )
    path.write_text(f'<VRTDataset rasterXSize="{WIDTH}" rasterYSize="{HEIGHT}">{"".join(bands)}</VRTDataset>')
