"""A fixed-size tile-record file with a checksum per tile: the low-level storage of :mod:`coninfer.store`.

Each array is a plain file of fixed-size tile records, read and written with ``pread``/``pwrite``, next to a
checksum file (``<name>.crc``: one uint64 per tile, ``crc32 | 1 << 32`` once written, 0 never written).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from coninfer.errors import InputError, OutputError

_SPACE_HINT = "free some disk space, or pass --workdir with a folder on a disk with more room"
_RESUME_HINT = "pass --no-resume to start over"
_WRITTEN = 1 << 32  # set in every written checksum slot, so that 0 means "never written"
_VERIFY_TILES = 64  # tiles per read while verifying


class StoreCorruptError(InputError):
    """The work store fails its checks: a damaged, truncated, missing or foreign file.

    ``folder`` is the work folder; ``tiles`` the damaged tiles (empty when the damage is not in tile records).
    """

    def __init__(self, folder: Path, problem: str, tiles: Iterable[int] = ()) -> None:
        self.folder = Path(folder)
        self.tiles = sorted({int(tile) for tile in tiles})
        where = f" at tile(s) {describe_tiles(self.tiles)}" if self.tiles else ""
        super().__init__(f"the work folder {folder} is damaged: {problem}{where}", hint=_RESUME_HINT)


class TileFile:
    """A (tiles, patches[, channels]) array in a file with a checksum per tile, read and written by tile.

    Unlike ``np.memmap``, pages read or written here are not mapped into the process, so resident memory stays
    bounded by the tiles in hand however large the scene. Data written is visible to a later process as soon
    as the call returns. ``create=True`` starts empty; otherwise existing records are kept (a file of the wrong
    size is resized, and its lost records then fail their checksums). Reading a tile that was never written,
    or whose record does not match its checksum, raises :class:`StoreCorruptError`.
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], *, create: bool = False) -> None:
        self.path = Path(path)
        self.checksum_path = self.path.with_name(self.path.name + ".crc")
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.tile_shape = self.shape[1:]
        self.tile_bytes = int(np.prod(self.tile_shape)) * self.dtype.itemsize
        self._verified = np.zeros(self.shape[0], bool)  # tiles checked (or written) in this session
        self._fd = self._checksum_fd = -1
        try:
            self._fd = _open_sized(self.path, self.shape[0] * self.tile_bytes, clear=create)
            self._checksum_fd = _open_sized(self.checksum_path, self.shape[0] * 8, clear=create)
        except OSError as error:
            self.close()
            raise _write_error(self.path, error) from error

    def __getitem__(self, indices: int | Sequence[int]) -> np.ndarray:
        """One tile ``tile_shape``, or (len(indices), *tile_shape) for a list of tile indexes."""
        single = isinstance(indices, (int, np.integer))
        tiles = [int(indices)] if single else [int(i) for i in indices]
        values = self._read(tiles)
        pending = [i for i, tile in enumerate(tiles) if not self._verified[tile]]
        if pending:
            damaged = self._mismatches([tiles[i] for i in pending], values[pending])
            if damaged:
                raise StoreCorruptError(self.path.parent, f"{self.path.name} fails its checksum", damaged)
        return values[0] if single else values

    def __setitem__(self, indices: int | Sequence[int], values: np.ndarray) -> None:
        tiles = [int(indices)] if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]
        values = np.ascontiguousarray(values, dtype=self.dtype).reshape(len(tiles), *self.tile_shape)
        sums = np.array([zlib.crc32(value) | _WRITTEN for value in values], "<u8")
        done = 0
        for start, count in _runs(tiles, self.shape[0]):
            try:  # the data first, then its checksums: a kill in between leaves a record that fails its check
                _pwrite_all(self._fd, values[done : done + count], start * self.tile_bytes)
                _pwrite_all(self._checksum_fd, sums[done : done + count], start * 8)
            except OSError as error:
                raise _write_error(self.path, error) from error
            done += count
        self._verified[tiles] = True

    def checksums(self, tiles: Sequence[int]) -> np.ndarray:
        """(len(tiles),) uint64: the recorded checksum of each tile (0: never written)."""
        tiles = [int(i) for i in tiles]
        out = np.zeros(len(tiles), "<u8")
        done = 0
        for start, count in _runs(tiles, self.shape[0]):
            chunk = os.pread(self._checksum_fd, count * 8, start * 8)
            out[done : done + len(chunk) // 8] = np.frombuffer(chunk, "<u8", len(chunk) // 8)
            done += count
        return out

    def damaged(self, tiles: Sequence[int]) -> list[int]:
        """The tiles among ``tiles`` whose record was never written or does not match its checksum (read
        again from disk, whatever this session checked before)."""
        tiles = sorted({int(i) for i in tiles})
        damaged = []
        for first in range(0, len(tiles), _VERIFY_TILES):
            group = tiles[first : first + _VERIFY_TILES]
            self._verified[group] = False
            damaged += self._mismatches(group, self._read(group))
        return damaged

    def _read(self, tiles: list[int]) -> np.ndarray:
        """(len(tiles), *tile_shape) records as stored; bytes past the end of a truncated file read as 0."""
        out = np.zeros((len(tiles), *self.tile_shape), self.dtype)
        if not tiles:
            return out
        flat = memoryview(out).cast("B")
        done = 0
        for start, count in _runs(tiles, self.shape[0]):
            os.preadv(self._fd, [flat[done * self.tile_bytes : (done + count) * self.tile_bytes]],
                      start * self.tile_bytes)
            done += count
        return out

    def _mismatches(self, tiles: list[int], values: np.ndarray) -> list[int]:
        """Tiles whose ``values`` do not match their recorded checksum; the others are marked verified."""
        recorded = self.checksums(tiles)
        damaged = [tile for tile, value, stored in zip(tiles, values, recorded, strict=True)
                   if int(stored) != zlib.crc32(np.ascontiguousarray(value)) | _WRITTEN]
        self._verified[sorted(set(tiles) - set(damaged))] = True
        return damaged

    def close(self) -> None:
        for name in ("_fd", "_checksum_fd"):
            if getattr(self, name, -1) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)

    def __del__(self) -> None:
        self.close()


def _pwrite_all(fd: int, values: np.ndarray, offset: int) -> None:
    """Write a C-contiguous array's bytes at ``offset`` from its own memory (no ``tobytes`` copy), looping over
    short writes (``pwrite`` may write less than asked, e.g. past 2 GiB on Linux)."""
    view = memoryview(values).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


def describe_tiles(tiles: Sequence[int], limit: int = 8) -> str:
    """Sorted tile indexes as ranges (``3, 7..9``), the first ``limit`` ranges and a count of the rest."""
    ranges = [f"{start}" if stop == start + 1 else f"{start}..{stop - 1}" for start, stop in _to_ranges(tiles)]
    more = f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else ""
    return ", ".join(ranges[:limit]) + more


def _to_ranges(tiles: Iterable[int]) -> list[list[int]]:
    """Tile indexes as sorted [start, stop) runs."""
    ranges: list[list[int]] = []
    for tile in sorted(set(tiles)):
        if ranges and ranges[-1][1] == tile:
            ranges[-1][1] += 1
        else:
            ranges.append([tile, tile + 1])
    return ranges


def _runs(indices: Sequence[int], num_tiles: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs of tile indexes as (start, count), in the given order; IndexError outside the array."""
    start = 0
    while start < len(indices):
        stop = start + 1
        while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
            stop += 1
        if indices[start] < 0 or indices[stop - 1] >= num_tiles:
            raise IndexError(f"tiles {indices[start]}..{indices[stop - 1]} outside 0..{num_tiles - 1}")
        yield indices[start], stop - start
        start = stop


def _open_sized(path: Path, size: int, *, clear: bool) -> int:
    """A read-write descriptor of ``path`` (created if missing, emptied if ``clear``), ``size`` bytes long."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if clear:
            os.ftruncate(fd, 0)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # sparse: only written tiles take disk space
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_error(path: Path, error: OSError) -> OutputError:
    """A failed write into the store (a full disk, most often) as a one-line error saying what to do."""
    return OutputError(f"cannot write the work store {path}: {error.strerror or error}", hint=_SPACE_HINT)
