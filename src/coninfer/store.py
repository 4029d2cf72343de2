"""The on-disk store of a scene run: per-tile priors, features, patch validity and solver output.

Each array is a plain file of fixed-size tile records, read and written with ``pread``/``pwrite``; progress is a
small ``state.json`` replaced atomically after the data, so a run killed at any point resumes at the first
unrecorded group of tiles and computes exactly the same numbers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from coninfer.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one store are then the user's to avoid
    fcntl = None

logger = logging.getLogger(__name__)

STORE_VERSION = 1
_SPACE_HINT = "free some disk space, or pass --workdir with a folder on a disk with more room"


class TileFile:
    """A (tiles, patches[, channels]) array in a file, read and written tile by tile with pread/pwrite.

    Unlike ``np.memmap``, pages read or written here are not mapped into the process, so resident memory stays
    bounded by the tiles in hand however large the scene (the kernel's page cache still speeds up the passes).
    Data written is visible to a later process as soon as the call returns, so a killed run loses nothing it
    recorded as done.
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], *, create: bool) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.tile_shape = shape[1:]
        self.tile_bytes = int(np.prod(self.tile_shape)) * self.dtype.itemsize
        self._fd = -1
        try:
            if create or not path.exists():
                with open(path, "wb") as handle:  # sparse: only written tiles take disk space
                    handle.truncate(shape[0] * self.tile_bytes)
            self._fd = os.open(path, os.O_RDWR)
        except OSError as error:
            raise _write_error(path, error) from error

    def __getitem__(self, indices: int | Sequence[int]) -> np.ndarray:
        """One tile ``tile_shape``, or (len(indices), *tile_shape) for a list of tile indexes."""
        if isinstance(indices, (int, np.integer)):
            return self._read_run(int(indices), 1)[0]
        parts = [self._read_run(start, count) for start, count in _runs(indices)]
        return np.concatenate(parts) if parts else np.empty((0, *self.tile_shape), self.dtype)

    def __setitem__(self, indices: int | Sequence[int], values: np.ndarray) -> None:
        indices = [int(indices)] if isinstance(indices, (int, np.integer)) else list(indices)
        values = np.ascontiguousarray(values, dtype=self.dtype).reshape(len(indices), *self.tile_shape)
        done = 0
        for start, count in _runs(indices):
            if start < 0 or start + count > self.shape[0]:
                raise IndexError(f"tiles {start}..{start + count - 1} outside 0..{self.shape[0] - 1}")
            try:
                os.pwrite(self._fd, values[done : done + count].tobytes(), start * self.tile_bytes)
            except OSError as error:
                raise _write_error(self.path, error) from error
            done += count

    def _read_run(self, start: int, count: int) -> np.ndarray:
        if start < 0 or start + count > self.shape[0]:
            raise IndexError(f"tiles {start}..{start + count - 1} outside 0..{self.shape[0] - 1}")
        out = np.empty((count, *self.tile_shape), self.dtype)
        read = os.preadv(self._fd, [memoryview(out).cast("B")], start * self.tile_bytes)
        if read != out.nbytes:
            raise OSError(f"{self.path}: short read of tiles {start}..{start + count - 1}")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of sorted-or-not tile indexes as (start, count), in the given order."""
    indices = [int(i) for i in indices]
    start = 0
    while start < len(indices):
        stop = start + 1
        while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
            stop += 1
        yield indices[start], stop - start
        start = stop


class TileStore:
    """Per-tile priors, features, patch validity and solver output of one scene run, in ``folder``."""

    def __init__(self, folder: Path, num_tiles: int, num_patches: int, num_queries: int) -> None:
        self.folder = folder
        self.shape = (num_tiles, num_patches)
        self.num_queries = num_queries
        self.state_path = folder / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "version": STORE_VERSION, "next_tile": 0, "empty": [], "feature_dim": None, "solved": False}
        fresh = not self.state["next_tile"]
        self.logits = self._file("logits.f32", np.float32, num_queries, create=fresh)
        self.valid = self._file("valid.u8", np.uint8, None, create=fresh)
        self.features: TileFile | None = None
        if self.state["feature_dim"]:
            self.features = self._file("features.f16", np.float16, self.state["feature_dim"], create=False)
        self.z = self._file("z.f32", np.float32, num_queries, create=not self.state["solved"])
        self.resumed_from = self.state["next_tile"]  # tiles an earlier, interrupted run already encoded

    def close(self) -> None:
        for array in (self.logits, self.valid, self.features, self.z):
            if array is not None:
                array.close()

    def _file(self, name: str, dtype, last: int | None, *, create: bool) -> TileFile:
        shape = self.shape + ((last,) if last else ())
        return TileFile(self.folder / name, dtype, shape, create=create)

    def put(self, indices: Sequence[int], logits: np.ndarray, features: np.ndarray, valid: np.ndarray) -> None:
        if self.features is None:
            self.state["feature_dim"] = int(features.shape[-1])
            self.features = self._file("features.f16", np.float16, features.shape[-1], create=True)
        self.logits[indices] = logits
        self.features[indices] = features.astype(np.float16)
        self.valid[indices] = valid

    def commit(self, next_tile: int, empty: Sequence[int] = (), solved: bool | None = None) -> None:
        """Record progress atomically, after the data (so a kill never records unsaved work)."""
        self.state["next_tile"] = next_tile
        self.state["empty"] = sorted(set(self.state["empty"]) | set(int(i) for i in empty))
        if solved is not None:
            self.state["solved"] = solved
        temporary = self.state_path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(self.state))
            os.replace(temporary, self.state_path)
        except OSError as error:
            raise _write_error(self.state_path, error) from error


def _write_error(path: Path, error: OSError) -> OutputError:
    """A failed write into the store (a full disk, most often) as a one-line error saying what to do."""
    return OutputError(f"cannot write the work store {path}: {error.strerror or error}", hint=_SPACE_HINT)


@contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and hold an exclusive lock on it for the block, so that two runs (processes or threads)
    never write one store. The lock goes with the process, so a killed run leaves none behind.

    Raises:
        OutputError: another run holds the lock, or the folder cannot be created.
    """
    for _attempt in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = os.open(folder, os.O_RDONLY)
        except OSError as error:
            raise OutputError(f"cannot create the work folder {folder}: {error.strerror or error}",
                              hint="pass --workdir with a writable folder") from error
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise OutputError(f"another run is using the work folder {folder} (same input and settings)",
                              hint="wait for it to finish, or pass another --workdir") from None
        except OSError as error:  # a file system without locks: run unlocked rather than not at all
            logger.warning("cannot lock the work folder %s (%s): two identical runs would share it", folder,
                           error.strerror or error)
        try:
            if os.stat(folder).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)  # the run that held the lock removed the folder meanwhile: lock the new one
    else:
        raise OutputError(f"the work folder {folder} keeps disappearing", hint="pass another --workdir")
    try:
        yield folder
    finally:
        os.close(handle)


def clear_folder(folder: Path) -> None:
    """Delete what ``folder`` holds, keeping the folder itself (and a lock held on it)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
