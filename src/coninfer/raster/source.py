"""Where a scene comes from: local files, GDAL virtual paths and URLs, and the GDAL settings to read them.

Local paths are checked before GDAL sees them (missing file, folder). Anything else GDAL opens by name is kept
as a ``str``, never a ``Path`` (pathlib collapses the ``//`` of ``/vsicurl/https://...``):

- URLs (``https://``, ``http://``, ``s3://``, ``gs://``, ``az://``...): rasterio maps them to GDAL's virtual
  file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``...), which read byte ranges on demand, so a scene is
  read window by window and never downloaded whole; the server must support HTTP range requests;
- ``/vsi...`` paths (``/vsizip/archive.zip/scene.tif``, ``/vsicurl/...``);
- driver-prefixed subdataset names such as ``GTIFF_DIR:2:scene.tif`` (page 2 of a multi-page TIFF).

:func:`gdal_env` holds GDAL's block cache to :data:`GDAL_CACHE_BYTES` and, for remote paths, sets
:data:`REMOTE_OPTIONS`; options the user set in the environment always win.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError

from coninfer.errors import InputFileError

GDAL_CACHE_BYTES = 256 * 2**20
"""GDAL's block cache while reading, in bytes. rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64,
so it is a number of BYTES (``GDAL_CACHEMAX=256`` is 256 bytes: every block is decompressed again for each
row read through it); rasterio refuses strings such as "256MB"."""

REMOTE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
"""GDAL options for URLs and /vsi paths. EMPTY_DIR: no directory listing and no probes for sidecar files
(.aux.xml, .msk, .ovr...): opening a COG over HTTP takes 3 requests instead of 22, so remote sidecars are not
read. Connect timeout (s): an unreachable host fails in 20 s, not curl's 300 s. Retries: transient HTTP errors
(429, 502-504) during a long read are retried 3 times, 1 s apart. CPL_VSIL_CURL_ALLOWED_EXTENSIONS is left
alone: it would refuse URLs without a raster extension (signed URLs, APIs), and EMPTY_DIR already avoids
the probing it is meant to cut."""

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SUBDATASET = re.compile(r"^[A-Za-z][A-Za-z0-9_]+:")
"""Driver-prefixed names (GTIFF_DIR:2:a.tif, NETCDF:"a.nc":var); 2+ letters, so C:\\ stays a local path."""

_NO_RANGE = "Range downloading not supported"


def is_virtual(path: str | Path) -> bool:
    """True for names only GDAL can resolve: URLs, ``/vsi...`` paths and driver-prefixed subdatasets."""
    text = str(path)
    return text.startswith("/vsi") or bool(_URL.match(text)) or bool(_SUBDATASET.match(text))


def is_remote(path: str | Path) -> bool:
    """True for URLs and GDAL's network file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``...)."""
    text = str(path)
    if _URL.match(text):
        return not text.startswith("file://")
    return text.startswith("/vsi") and not text.startswith(("/vsimem/", "/vsizip/", "/vsitar/", "/vsigzip/"))


def source_path(path: str | Path) -> str | Path:
    """``path`` as it is handed to rasterio: a checked ``Path`` for local files, the ``str`` otherwise.

    Raises:
        InputFileError: a local path that does not exist or is a folder.
    """
    if is_virtual(path):
        return str(path)
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"input raster {path} does not exist", hint="check the path")
    if path.is_dir():
        raise InputFileError(f"input raster {path} is a folder", hint="pass a raster file such as a GeoTIFF")
    return path


def gdal_cache_env() -> rasterio.Env:
    """A ``rasterio.Env`` whose GDAL block cache is :data:`GDAL_CACHE_BYTES` (256 MiB), unless the user set
    GDAL_CACHEMAX in the environment (then GDAL reads theirs, e.g. ``GDAL_CACHEMAX=512`` = 512 MB)."""
    if "GDAL_CACHEMAX" in os.environ:
        return rasterio.Env()
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)


def gdal_env(path: str | Path) -> rasterio.Env:
    """``rasterio.Env`` for reading ``path``: the bounded cache of :func:`gdal_cache_env`, plus
    :data:`REMOTE_OPTIONS` (those not set in the environment) when ``path`` is remote."""
    options = {}
    if "GDAL_CACHEMAX" not in os.environ:
        options["GDAL_CACHEMAX"] = GDAL_CACHE_BYTES
    if is_remote(path):
        options.update({key: value for key, value in REMOTE_OPTIONS.items() if key not in os.environ})
    return rasterio.Env(**options)


def open_error(path: str | Path, error: RasterioError) -> InputFileError:
    """The one-line :class:`InputFileError` for a raster GDAL cannot open or read."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if _NO_RANGE in reason:
        return InputFileError(
            f"cannot read {path}: the server does not support HTTP range requests, which reading a remote "
            "raster window by window needs",
            hint="download the file (e.g. curl -O) and pass the local path, or serve it with range requests",
        )
    if is_remote(path):
        return InputFileError(
            f"cannot open {path}: {reason}",
            hint="check the URL, the network and, for s3:// or gs://, the credentials in the environment",
        )
    if is_virtual(path):
        return InputFileError(
            f"cannot read {path} as a raster: {reason}",
            hint="check the GDAL virtual path: the archive exists and holds that member (e.g. /vsizip/a.zip/b.tif)",
        )
    return InputFileError(
        f"cannot read {path} as a raster: {reason}",
        hint="pass a raster GDAL reads (GeoTIFF, JPEG2000, VRT, PNG, ...) and check that it is complete",
    )


__all__ = [
    "GDAL_CACHE_BYTES",
    "REMOTE_OPTIONS",
    "gdal_cache_env",
    "gdal_env",
    "is_remote",
    "is_virtual",
    "open_error",
    "source_path",
]
