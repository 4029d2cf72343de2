"""The on-disk store of a scene run: per-tile priors, features, patch validity and solver output.

Each array is a plain file of fixed-size tile records, read and written with ``pread``/``pwrite``, next to a
checksum file (``<name>.crc``: one uint64 per tile, ``crc32 | 1 << 32`` once written, 0 never written). Every
read checks the records it returns (each tile once per session), so a damaged, truncated or deleted file
raises :class:`StoreCorruptError` naming the tiles instead of handing back wrong numbers.

Progress lives in small JSON records, each carrying a checksum of itself and replaced atomically after the data:
``state.json`` (the store's dimensions) and one ``progress-<rank>.json`` per writer (tiles encoded, tiles
empty, contexts solved). Several writers (ranks) fill one store, each recording only its own work; what is
done is the union of all records, so a rerun with any number of writers resumes exactly the missing tiles. A
solved context records a fingerprint of its inputs' checksums: re-encoding one of its tiles differently
makes it unsolved again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from coninfer.errors import OutputError
from coninfer.tile_file import StoreCorruptError, TileFile, _to_ranges, _write_error, describe_tiles

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one store are then the user's to avoid
    fcntl = None

logger = logging.getLogger(__name__)

STORE_VERSION = 2
"""Version of the store's layout; a store of another version is refused (it is part of the work folder key)."""
_RECORD = re.compile(r"^progress-(\d+)\.json$")


class TileStore:
    """Per-tile priors, features, patch validity and solver output of one scene run, in ``folder``.

    Writer ``rank`` of ``num_ranks`` records its progress in ``progress-<rank>.json``; the single-writer
    default is rank 0 of 1. Opening creates the store if ``folder`` holds none (several writers may open one
    folder at once) and raises :class:`StoreCorruptError` if its records are damaged or of another version or
    size; damaged tile records are found by :meth:`verify` (or by the read that meets them).
    """

    def __init__(self, folder: Path, num_tiles: int, num_patches: int, num_queries: int, *, rank: int = 0,
                 num_ranks: int = 1) -> None:
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is not in 0..{num_ranks - 1}")
        self.folder = Path(folder)
        self.shape = (num_tiles, num_patches)
        self.num_queries = num_queries
        self.rank, self.num_ranks = rank, num_ranks
        self.state_path = self.folder / "state.json"
        self._record_path = self.folder / f"progress-{rank}.json"
        self.feature_dim: int | None = self._open_state()
        self.logits = self._file("logits.f32", np.float32, num_queries)
        self.valid = self._file("valid.u8", np.uint8, None)
        self.z = self._file("z.f32", np.float32, num_queries)
        self.features = self._file("features.f16", np.float16, self.feature_dim) if self.feature_dim else None
        self.resumed_from = self.state["next_tile"]  # tiles before it an earlier run already stored

    # -- opening and closing ----------------------------------------------------------------------------------

    def _open_state(self) -> int | None:
        """The feature dimension recorded in ``state.json`` (written now for a new store)."""
        if not self.state_path.exists():
            if any(_RECORD.match(path.name) for path in self.folder.glob("progress-*.json")):
                raise StoreCorruptError(self.folder, "state.json is missing but progress records exist")
            self._write_state(None)
            return None
        state = self._read_json(self.state_path)
        dims = {"num_tiles": self.shape[0], "num_patches": self.shape[1], "num_queries": self.num_queries}
        found = {key: state.get(key) for key in dims}
        if found != dims:
            raise StoreCorruptError(self.folder, f"state.json describes a store of {found}, not {dims}")
        return state.get("feature_dim")

    def _write_state(self, feature_dim: int | None) -> None:
        self._write_json(self.state_path, {"num_tiles": self.shape[0], "num_patches": self.shape[1],
                                           "num_queries": self.num_queries, "feature_dim": feature_dim})

    def _file(self, name: str, dtype, last: int | None) -> TileFile:
        return TileFile(self.folder / name, dtype, self.shape + ((last,) if last else ()))

    def close(self) -> None:
        for array in (self.logits, self.valid, self.features, self.z):
            if array is not None:
                array.close()

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------------------

    def put(self, indices: Sequence[int], logits: np.ndarray, features: np.ndarray, valid: np.ndarray) -> None:
        """Store encoded tiles: logits (n, P, K), features (n, P, D) (kept as float16), valid (n, P) uint8.
        Call :meth:`record` (or :meth:`commit`) afterwards to count them as done."""
        dim = int(features.shape[-1])
        if self.features is None:
            self.feature_dim = self._read_json(self.state_path).get("feature_dim")  # another writer's?
            if self.feature_dim is None:
                self._write_state(dim)  # before any data, so no stored feature lacks its dimension
                self.feature_dim = dim
            self.features = self._file("features.f16", np.float16, self.feature_dim)
        if dim != self.feature_dim:
            raise ValueError(f"features have {dim} channels, the store holds {self.feature_dim}")
        self.logits[indices] = logits
        self.features[indices] = features.astype(np.float16)
        self.valid[indices] = valid

    def record(self, *, encoded: Iterable[int] = (), empty: Iterable[int] = (),
               solved: Mapping[int, Sequence[int]] | None = None) -> None:
        """Add to this writer's progress record, atomically, after the data (a kill never records unsaved
        work): tiles ``encoded`` (their data was :meth:`put`), tiles ``empty`` (nothing to encode), and
        ``solved`` contexts (context id -> its tiles, all encoded, whose z was written)."""
        record = self._load_record(self._record_path)
        record["encoded"] |= _checked(encoded, self.shape[0])
        record["empty"] |= _checked(empty, self.shape[0])
        if solved:
            known = self._progress()["encoded"] | record["encoded"]
            for context, tiles in solved.items():
                tiles = sorted(_checked(tiles, self.shape[0]))
                if not known.issuperset(tiles):
                    raise ValueError(f"context {context} holds tiles not encoded: "
                                     f"{describe_tiles(sorted(set(tiles) - known))}")
                record["solved"][int(context)] = {"tiles": tiles, "inputs": self._fingerprint(tiles)}
        self._write_record(self._record_path, record)

    def commit(self, next_tile: int, empty: Sequence[int] = (), solved: bool | None = None) -> None:
        """The single writer's :meth:`record`: every tile before ``next_tile`` is stored, those in ``empty``
        (now or before) are empty; ``solved=True`` records every encoded tile as solved (context 0)."""
        empty = _checked(empty, self.shape[0])
        known_empty = empty | self._progress()["empty"]
        self.record(encoded=[tile for tile in range(next_tile) if tile not in known_empty], empty=empty)
        if solved:
            self.record(solved={0: sorted(self._progress()["encoded"])})

    # -- reading progress -----------------------------------------------------------------------------------

    def encoded_tiles(self) -> list[int]:
        """Tiles some writer encoded and recorded."""
        return sorted(self._progress()["encoded"])

    def empty_tiles(self) -> list[int]:
        """Tiles some writer found empty (no valid pixel)."""
        return sorted(self._progress()["empty"])

    def missing_tiles(self) -> list[int]:
        """Tiles no writer has recorded as encoded or empty: the work left."""
        progress = self._progress()
        done = progress["encoded"] | progress["empty"]
        return [tile for tile in range(self.shape[0]) if tile not in done]

    def solved_contexts(self) -> dict[int, list[int]]:
        """Context id -> tiles of each solved context whose tiles are all still encoded from the same inputs."""
        progress = self._progress()
        return {context: entry["tiles"] for context, entry in sorted(progress["solved"].items())
                if progress["encoded"].issuperset(entry["tiles"])
                and entry["inputs"] == self._fingerprint(entry["tiles"])}

    def share(self, tiles: Sequence[int]) -> list[int]:
        """This writer's contiguous part of ``tiles`` (the parts of ranks 0..num_ranks-1 cover them in order)."""
        count = len(tiles)
        return list(tiles[count * self.rank // self.num_ranks : count * (self.rank + 1) // self.num_ranks])

    @property
    def state(self) -> dict:
        """Progress in the single writer's terms: ``next_tile`` (the first missing tile, ``num_tiles`` when
        none), ``empty`` (sorted), ``feature_dim``, ``solved`` (every encoded tile lies in a solved context)."""
        missing = self.missing_tiles()
        covered = {tile for tiles in self.solved_contexts().values() for tile in tiles}
        solved = bool(covered) and covered.issuperset(self._progress()["encoded"])
        return {"version": STORE_VERSION, "next_tile": missing[0] if missing else self.shape[0],
                "empty": self.empty_tiles(), "feature_dim": self.feature_dim, "solved": solved}

    # -- checking and repairing ----------------------------------------------------------------------------

    def verify(self, tiles: Iterable[int] | None = None) -> list[int]:
        """The damaged tiles among ``tiles`` (default: all): encoded tiles whose logits, features or validity,
        or (in a solved context) z, fail their checksums. Reads every such record once."""
        progress = self._progress()
        wanted = progress["encoded"] if tiles is None else progress["encoded"] & {int(t) for t in tiles}
        if not wanted:
            return []
        damaged = set(wanted) if self.features is None else set(self.features.damaged(wanted))
        damaged.update(self.logits.damaged(wanted), self.valid.damaged(wanted))
        solved = {tile for tiles in self.solved_contexts().values() for tile in tiles}
        damaged.update(self.z.damaged(wanted & solved))
        return sorted(damaged)

    def discard(self, tiles: Iterable[int]) -> None:
        """Make ``tiles`` missing again in every writer's record and unsolve the contexts holding them (call
        it while no other writer is at work)."""
        tiles = {int(tile) for tile in tiles}
        for path in sorted(self.folder.glob("progress-*.json")):
            if not _RECORD.match(path.name):
                continue
            record = self._load_record(path)
            kept = {context: entry for context, entry in record["solved"].items()
                    if tiles.isdisjoint(entry["tiles"])}
            if tiles & (record["encoded"] | record["empty"]) or len(kept) < len(record["solved"]):
                record.update(encoded=record["encoded"] - tiles, empty=record["empty"] - tiles, solved=kept)
                self._write_record(path, record)

    def repair(self) -> list[int]:
        """:meth:`verify` every tile and :meth:`discard` the damaged ones, saying so in one warning; returns
        them (the caller encodes them again, then solves the contexts that became unsolved)."""
        damaged = self.verify()
        if damaged:
            logger.warning("the work folder %s holds %d damaged tile(s) (%s): encoding them again", self.folder,
                           len(damaged), describe_tiles(damaged))
            self.discard(damaged)
        return damaged

    # -- records ------------------------------------------------------------------------------------------

    def _progress(self) -> dict:
        """The union of every writer's record: encoded and empty tile sets, solved contexts by id."""
        union: dict = {"encoded": set(), "empty": set(), "solved": {}}
        for path in sorted(self.folder.glob("progress-*.json")):
            if _RECORD.match(path.name):
                record = self._load_record(path)
                union["encoded"] |= record["encoded"]
                union["empty"] |= record["empty"]
                union["solved"].update(record["solved"])
        return union

    def _fingerprint(self, tiles: Sequence[int]) -> str:
        """A digest of the input checksums of ``tiles``: it changes when any of them is stored anew."""
        digest = hashlib.blake2b(np.asarray(tiles, "<i8").tobytes(), digest_size=16)
        for array in (self.logits, self.valid, self.features):
            digest.update(b"-" if array is None else array.checksums(tiles).tobytes())
        return digest.hexdigest()

    def _load_record(self, path: Path) -> dict:
        if not path.exists():
            return {"encoded": set(), "empty": set(), "solved": {}}
        payload = self._read_json(path)
        try:
            return {"encoded": _from_ranges(payload["encoded"]), "empty": _from_ranges(payload["empty"]),
                    "solved": {int(context): {"tiles": sorted(_from_ranges(entry["tiles"])),
                                              "inputs": str(entry["inputs"])}
                               for context, entry in payload["solved"].items()}}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StoreCorruptError(self.folder, f"{path.name} is not a progress record") from error

    def _write_record(self, path: Path, record: dict) -> None:
        self._write_json(path, {
            "encoded": _to_ranges(record["encoded"]), "empty": _to_ranges(record["empty"]),
            "solved": {str(context): {"tiles": _to_ranges(entry["tiles"]), "inputs": entry["inputs"]}
                       for context, entry in sorted(record["solved"].items())}})

    def _read_json(self, path: Path) -> dict:
        """A record's payload, checked: unreadable, damaged or foreign records raise StoreCorruptError."""
        try:
            payload = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise StoreCorruptError(self.folder, f"{path.name} is missing") from None
        except (OSError, ValueError) as error:
            raise StoreCorruptError(self.folder, f"{path.name} cannot be read (truncated or overwritten)") from error
        if not isinstance(payload, dict):
            raise StoreCorruptError(self.folder, f"{path.name} cannot be read (truncated or overwritten)")
        checksum = payload.pop("checksum", None)
        version = payload.get("version")
        if checksum == _digest(payload) and version == STORE_VERSION:
            return payload
        if checksum is None or checksum == _digest(payload):  # an intact record of another layout
            raise StoreCorruptError(self.folder, f"{path.name} is of store version {version}, this coninfer "
                                                 f"reads version {STORE_VERSION}")
        raise StoreCorruptError(self.folder, f"{path.name} fails its checksum")

    def _write_json(self, path: Path, payload: dict) -> None:
        payload = {**payload, "version": STORE_VERSION}
        data = json.dumps({**payload, "checksum": _digest(payload)}, sort_keys=True).encode()
        try:
            _atomic_write_bytes(path, data)
        except OSError as error:
            raise _write_error(path, error) from error


def _digest(payload: dict) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


def _from_ranges(ranges: list) -> set[int]:
    return {tile for start, stop in ranges for tile in range(int(start), int(stop))}


def _checked(tiles: Iterable[int], num_tiles: int) -> set[int]:
    tiles = {int(tile) for tile in tiles}
    if tiles and (min(tiles) < 0 or max(tiles) >= num_tiles):
        raise IndexError(f"tiles {describe_tiles(sorted(tiles))} not all in 0..{num_tiles - 1}")
    return tiles


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``.<name>.<pid>-<random>.coninfer-tmp<suffix>`` next to ``path``, flush it to disk,
    then move it onto ``path``: readers see the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.coninfer-tmp{path.suffix}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and hold an exclusive lock on it for the block, so that two runs (processes or threads)
    never write one store. The lock goes with the process, so a killed run leaves none behind. The writers of
    one run do not lock: the process that starts them holds the lock for them.

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
