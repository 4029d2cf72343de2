"""Shared pieces of the dataset converters: finding raw files (also inside .zip archives), reading and encoding
rasters without mmcv/cv2, window arithmetic, and idempotent, atomic output writing.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from coninfer._fs import atomic_write_bytes
from coninfer.errors import InputError, InputFileError, OutputError

_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class RawFile:
    """A file of the raw download: a plain file, or ``member`` of the zip archive at ``path``.

    ``parts`` are its path components starting at the scanned folder's own name, with a zip's members below the
    archive's name (``("LoveDA", "Val.zip", "Val", "Urban", "images_png", "3514.png")``).
    """

    path: Path
    parts: tuple[str, ...]
    member: str | None = None

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        try:
            if self.member is None:
                return self.path.read_bytes()
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(self.member)
        except (OSError, zipfile.BadZipFile, KeyError) as error:
            raise InputFileError(f"cannot read {self}: {error}", hint="check the download; re-extract it") from error

    def signature(self) -> list:
        """What identifies this input's content cheaply: location, size and modification time."""
        stat = self.path.stat()
        return [str(self.path), self.member, stat.st_size, stat.st_mtime_ns]


def scan_files(base: Path, *, zips: bool = False) -> list[RawFile]:
    """Every file below ``base`` (sorted); with ``zips`` the members of ``*.zip`` archives are listed as well."""
    base = Path(base)
    found: list[RawFile] = []
    for directory, subdirs, files in os.walk(base):
        subdirs.sort()
        rel = Path(directory).relative_to(base.parent).parts
        for filename in sorted(files):
            path = Path(directory) / filename
            if zips and filename.lower().endswith(".zip"):
                found.extend(_zip_members(path, rel + (filename,)))
            else:
                found.append(RawFile(path, rel + (filename,)))
    return found


def _zip_members(path: Path, prefix: tuple[str, ...]) -> Iterator[RawFile]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (OSError, zipfile.BadZipFile) as error:
        raise InputFileError(f"cannot open archive {path}: {error}", hint="re-download the archive") from error
    for member in sorted(names):
        yield RawFile(path, prefix + tuple(p for p in member.split("/") if p), member)


def require_dir(raw_dir: Path, dataset: str, raw_layout: str) -> Path:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputFileError(f"{dataset}: raw folder {raw_dir} does not exist", hint=f"expected {raw_layout}")
    return raw_dir


def locate_root(
    raw_dir: Path,
    required: Iterable[str],
    dataset: str,
    raw_layout: str,
    *,
    prefer_name: str | None = None,
    max_depth: int = 3,
) -> Path:
    """The folder at or below ``raw_dir`` (breadth first, ``max_depth`` levels) that holds every ``required`` path.

    Among several at the same depth, the one named ``prefer_name`` wins (e.g. DeepGlobe_test_1530 next to
    Massachusetts_test_49); otherwise the choice is left to the user.
    """
    required = tuple(required)
    level = [require_dir(raw_dir, dataset, raw_layout)]
    for _ in range(max_depth + 1):
        matches = [d for d in level if all((d / r).exists() for r in required)]
        preferred = [d for d in matches if d.name == prefer_name]
        if len(matches) == 1 or len(preferred) == 1:
            return (preferred or matches)[0]
        if len(matches) > 1:
            raise InputError(
                f"{dataset}: several folders in {raw_dir} hold {', '.join(required)}: "
                + ", ".join(str(m) for m in matches),
                hint="pass the one to convert as RAW_DIR",
            )
        level = sorted(child for d in level for child in d.iterdir() if child.is_dir())
    missing = [r for r in required if not (Path(raw_dir) / r).exists()]
    raise InputFileError(
        f"{dataset}: {raw_dir} lacks {', '.join(missing)} (also searched {max_depth} folder levels below it)",
        hint=f"expected {raw_layout}",
    )


def list_dir(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[RawFile]:
    """Files directly in ``folder`` (sorted), optionally only those with one of ``suffixes`` (case-sensitive)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if suffixes is not None:
        files = [p for p in files if p.name.endswith(suffixes)]
    return [RawFile(p, (folder.name, p.name)) for p in files]


def missing_error(dataset: str, what: str, names: list[str], raw_layout: str) -> InputFileError:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return InputFileError(f"{dataset}: missing {what}: {shown}", hint=f"expected {raw_layout}")


# --- reading ---------------------------------------------------------------------------------------------------


def _read_tiff(raw: RawFile) -> np.ndarray:
    import rasterio
    from rasterio.io import MemoryFile

    try:
        with warnings.catch_warnings():
            # label tiles and some orthophotos carry no georeference; that is fine here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            if raw.member is None:
                with rasterio.open(raw.path) as src:
                    bands = src.read()
            else:
                with MemoryFile(raw.read_bytes()) as memory, memory.open() as src:
                    bands = src.read()
    except rasterio.errors.RasterioError as error:
        raise InputFileError(f"cannot read {raw}: {error}", hint="check the download") from error
    return np.moveaxis(bands, 0, -1)  # (bands, H, W) -> (H, W, bands)


def _open_pillow(raw: RawFile) -> Image.Image:
    try:
        source = raw.path if raw.member is None else io.BytesIO(raw.read_bytes())
        image = Image.open(source)
        image.load()
    except OSError as error:
        raise InputFileError(f"cannot read {raw}: {error}", hint="check the download") from error
    return image


def _check_uint8(array: np.ndarray, raw: RawFile) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(f"{raw} has dtype {array.dtype}", hint="the benchmarks store 8-bit images and labels")
    return array


def read_rgb(raw: RawFile) -> np.ndarray:
    """(H, W, 3) uint8 RGB: GeoTIFF bands 1-3 (a single band repeated), other formats through Pillow."""
    if raw.suffix.lower() in _TIFF_SUFFIXES:
        array = _read_tiff(raw)
        array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    else:
        with _open_pillow(raw) as image:
            array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(_check_uint8(array, raw))


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luma, rounded like OpenCV's fixed-point COLOR_BGR2GRAY."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def read_gray(raw: RawFile) -> np.ndarray:
    """(H, W) uint8 as a grayscale read does: single-band data as stored, colour data converted to luma."""
    if raw.suffix.lower() in _TIFF_SUFFIXES:
        array = _check_uint8(_read_tiff(raw), raw)
        return array[..., 0] if array.shape[-1] == 1 else rgb_to_gray(array[..., :3])
    with _open_pillow(raw) as image:
        if image.mode == "L":
            return _check_uint8(np.asarray(image), raw)
        return rgb_to_gray(np.asarray(image.convert("RGB")))


def colour_to_index(rgb: np.ndarray, palette: dict[tuple[int, int, int], int], fill: int = 0) -> np.ndarray:
    """(H, W, 3) colour-coded label -> (H, W) uint8 class indices; colours not in ``palette`` become ``fill``."""
    # pack each RGB triplet into one integer so one lookup per pixel suffices
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    out = np.full(packed.shape, fill, dtype=np.uint8)
    for (r, g, b), index in palette.items():
        out[packed == ((r << 16) | (g << 8) | b)] = index
    return out


def binarise(gray: np.ndarray, threshold: int) -> np.ndarray:
    """(H, W) uint8 -> 0/1 uint8: 1 where ``gray >= threshold``."""
    return (gray >= threshold).astype(np.uint8)


# --- windows ---------------------------------------------------------------------------------------------------


def window_starts(length: int, size: int, step: int) -> list[int]:
    """Start offsets of windows of ``size`` every ``step`` pixels along ``length``.

    Windows start at 0, step, 2*step, ... while the start is inside the image; a window that would cross the border
    is shifted inward to end at it (start = length - size), and duplicates are dropped. ``length`` < ``size`` gives
    one window at 0 (callers pad or accept a smaller window). Example: length 6000, size 512, step 512 ->
    0, 512, ..., 5120, 5488 (12 windows).
    """
    if size <= 0 or step <= 0:
        raise InputError(f"window size {size} and step {step} must be positive", hint="use positive pixel counts")
    if length <= size:
        return [0]
    return sorted({min(k * step, length - size) for k in range(-(-length // step))})


def pad_bottom_right(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    """Pad (H, W[, C]) at the bottom and right to at least (height, width) with ``value``."""
    pad_h, pad_w = max(height - array.shape[0], 0), max(width - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


# --- writing ---------------------------------------------------------------------------------------------------


def encode(array: np.ndarray, suffix: str) -> bytes:
    """Encode (H, W) or (H, W, 3) uint8 in the format of ``suffix`` (.png, .tif, .jpg) with fixed settings."""
    image = Image.fromarray(np.ascontiguousarray(array))
    buffer = io.BytesIO()
    suffix = suffix.lower()
    if suffix == ".png":
        # RGB patches are large: fast compression; labels compress well at the default level
        image.save(buffer, format="PNG", compress_level=1 if array.ndim == 3 else 6)
    elif suffix in _TIFF_SUFFIXES:
        image.save(buffer, format="TIFF")
    elif suffix in (".jpg", ".jpeg"):
        image.save(buffer, format="JPEG", quality=95)  # OpenCV's default JPEG quality
    else:
        raise InputError(f"cannot encode {suffix!r} files", hint="use .png, .tif or .jpg")
    return buffer.getvalue()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes; True when written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}", hint="check that OUT_DIR is writable and has space") from error
    return True
