"""The on-disk stores of a scene run: what does not depend on the classes, and what does.

:class:`EmbeddingStore` holds the class-independent part of every tile: dense CLIP patch embeddings, solver
features (VFM or CLIP) and patch validity. :class:`TileStore` holds the class-dependent part of one query set
(priors, solver output) and reads features and validity from its embedding store. A run with other classes,
synonyms, temperature or threshold on the same scene and models opens the same embedding store and a new
:class:`TileStore`, so neither encoder runs again (``--keep-embeddings``).

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
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from coninfer._fs import clear_folder, locked_folder  # noqa: F401 - the store's folder API
from coninfer.tile_file import StoreCorruptError, TileFile, _to_ranges, _write_error, describe_tiles

logger = logging.getLogger(__name__)

STORE_VERSION = 3
"""Version of the store's layout; a store of another version is refused (it is part of the work folder key)."""


class _Records:
    """The checksummed JSON records of one store folder: a state file (its dimensions) and one progress record
    per writer (tiles encoded, tiles empty, contexts solved); what is done is the union of all records."""

    STATE = "state.json"
    RECORD = "progress"

    def __init__(self, folder: Path, num_tiles: int, num_patches: int, dims: dict, *, rank: int,
                 num_ranks: int) -> None:
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is not in 0..{num_ranks - 1}")
        self.folder = Path(folder)
        self.shape = (num_tiles, num_patches)
        self.rank, self.num_ranks = rank, num_ranks
        self.state_path = self.folder / self.STATE
        self._record_path = self.folder / f"{self.RECORD}-{rank}.json"
        self._pattern = re.compile(rf"^{self.RECORD}-(\d+)\.json$")
        self._dims = {"num_tiles": num_tiles, "num_patches": num_patches, **dims}
        self._lazy = self._open_state()

    def _open_state(self) -> dict:
        """The lazily known channel counts recorded in the state file (written now for a new store)."""
        if not self.state_path.exists():
            if self._record_paths():
                raise StoreCorruptError(self.folder, f"{self.STATE} is missing but progress records exist")
            self._write_state({})
            return {}
        state = self._read_json(self.state_path)
        found = {key: state.get(key) for key in self._dims}
        if found != self._dims:
            raise StoreCorruptError(self.folder, f"{self.STATE} describes a store of {found}, not {self._dims}")
        return dict(state.get("lazy") or {})

    def _write_state(self, lazy: dict) -> None:
        self._write_json(self.state_path, {**self._dims, "lazy": lazy})

    def _lazy_dim(self, name: str, dim: int) -> int:
        """The channel count of array ``name``: another writer's, or ``dim`` recorded now (before any data)."""
        lazy = dict(self._read_json(self.state_path).get("lazy") or {})
        if lazy.get(name) is None:
            lazy[name] = dim
            self._write_state(lazy)
        self._lazy = lazy
        return int(lazy[name])

    def _file(self, name: str, dtype, last: int | None) -> TileFile:
        return TileFile(self.folder / name, dtype, self.shape + ((last,) if last else ()))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - every store overrides it
        raise NotImplementedError

    # -- progress -------------------------------------------------------------------------------------------

    def record(self, *, encoded: Iterable[int] = (), empty: Iterable[int] = (),
               solved: Mapping[int, Sequence[int]] | None = None) -> None:
        """Add to this writer's progress record, atomically, after the data (a kill never records unsaved
        work): tiles ``encoded`` (their data was put), tiles ``empty`` (nothing to encode), and ``solved``
        contexts (context id -> its tiles, all encoded, whose z was written)."""
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

    def share(self, tiles: Sequence[int]) -> list[int]:
        """This writer's contiguous part of ``tiles`` (the parts of ranks 0..num_ranks-1 cover them in order)."""
        count = len(tiles)
        return list(tiles[count * self.rank // self.num_ranks : count * (self.rank + 1) // self.num_ranks])

    def discard(self, tiles: Iterable[int]) -> None:
        """Make ``tiles`` missing again in every writer's record and unsolve the contexts holding them (call
        it while no other writer is at work)."""
        tiles = {int(tile) for tile in tiles}
        for path in self._record_paths():
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

    def verify(self, tiles: Iterable[int] | None = None) -> list[int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _fingerprint(self, tiles: Sequence[int]) -> str:
        """A digest of the input checksums of ``tiles``: it changes when any of them is stored anew."""
        digest = hashlib.blake2b(np.asarray(tiles, "<i8").tobytes(), digest_size=16)
        for array in self._inputs():
            digest.update(b"-" if array is None else array.checksums(tiles).tobytes())
        return digest.hexdigest()

    def _inputs(self) -> list[TileFile | None]:
        return []

    # -- records --------------------------------------------------------------------------------------------

    def _record_paths(self) -> list[Path]:
        return [path for path in sorted(self.folder.glob(f"{self.RECORD}-*.json")) if self._pattern.match(path.name)]

    def _progress(self) -> dict:
        """The union of every writer's record: encoded and empty tile sets, solved contexts by id."""
        union: dict = {"encoded": set(), "empty": set(), "solved": {}}
        for path in self._record_paths():
            record = self._load_record(path)
            union["encoded"] |= record["encoded"]
            union["empty"] |= record["empty"]
            union["solved"].update(record["solved"])
        return union

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


_EMBEDDING_FILES = {"clip": ("clip.f32", np.float32), "features": ("features.f16", np.float16)}


class EmbeddingStore(_Records):
    """The class-independent records of every tile: ``clip`` (T, P, E) float32 dense CLIP patch embeddings,
    ``features`` (T, P, D) float16 solver features, ``valid`` (T, P) uint8 patch validity.

    Writer ``rank`` of ``num_ranks`` records its progress in ``embedded-<rank>.json``. E and D are recorded by
    the first :meth:`put`. It may share a folder with a :class:`TileStore` (the names differ).
    """

    STATE = "embeddings.json"
    RECORD = "embedded"

    def __init__(self, folder: Path, num_tiles: int, num_patches: int, *, rank: int = 0, num_ranks: int = 1) -> None:
        super().__init__(folder, num_tiles, num_patches, {"kind": "embeddings"}, rank=rank, num_ranks=num_ranks)
        self.valid = self._file("valid.u8", np.uint8, None)
        self.clip: TileFile | None = None
        self.features: TileFile | None = None
        for name, (file_name, dtype) in _EMBEDDING_FILES.items():
            if self._lazy.get(name):
                setattr(self, name, self._file(file_name, dtype, self._lazy[name]))

    @property
    def feature_dim(self) -> int | None:
        return self._lazy.get("features")

    def put(self, indices: Sequence[int], features: np.ndarray, valid: np.ndarray, clip: np.ndarray | None = None
            ) -> None:
        """Store encoded tiles: features (n, P, D) (kept as float16), valid (n, P) uint8 and, when given, CLIP
        embeddings (n, P, E) float32. Call :meth:`record` afterwards to count them as done."""
        for name, values in (("features", features), ("clip", clip)):
            if values is None:
                continue
            dim = int(values.shape[-1])
            if getattr(self, name) is None:
                file_name, dtype = _EMBEDDING_FILES[name]
                setattr(self, name, self._file(file_name, dtype, self._lazy_dim(name, dim)))
            if dim != getattr(self, name).shape[-1]:
                raise ValueError(f"{name} have {dim} channels, the store holds {getattr(self, name).shape[-1]}")
        if clip is not None:
            self.clip[indices] = clip
        self.features[indices] = features.astype(np.float16, copy=False)
        self.valid[indices] = valid

    def verify(self, tiles: Iterable[int] | None = None) -> list[int]:
        """The damaged tiles among ``tiles`` (default: all) that a writer recorded: records failing their
        checksums. A store whose CLIP embeddings were never written (an older run) is not damaged by that."""
        encoded = self._progress()["encoded"]
        wanted = encoded if tiles is None else encoded & {int(t) for t in tiles}
        if not wanted:
            return []
        damaged = set(wanted) if self.features is None else set(self.features.damaged(wanted))
        damaged.update(self.valid.damaged(wanted))
        if self.clip is not None:
            damaged.update(self.clip.damaged(wanted))
        return sorted(damaged)

    def close(self) -> None:
        for array in (self.valid, self.clip, self.features):
            if array is not None:
                array.close()


class TileStore(_Records):
    """The class-dependent records of one query set over a scene: ``logits`` (T, P, K) float32 priors and ``z``
    (T, P, K) float32 solver output; ``features``, ``valid`` and ``clip`` are its :class:`EmbeddingStore`'s.

    ``embeddings`` defaults to an embedding store in the same folder (owned and closed with this one). Writer
    ``rank`` of ``num_ranks`` records its progress in ``progress-<rank>.json`` (tiles whose prior is stored,
    empty tiles, solved contexts). A solved context records a fingerprint of its inputs' checksums: storing one
    of its tiles anew makes it unsolved again.
    """

    def __init__(self, folder: Path, num_tiles: int, num_patches: int, num_queries: int, *,
                 embeddings: EmbeddingStore | None = None, rank: int = 0, num_ranks: int = 1) -> None:
        super().__init__(folder, num_tiles, num_patches, {"num_queries": num_queries}, rank=rank, num_ranks=num_ranks)
        self.num_queries = num_queries
        self._owns_embeddings = embeddings is None
        self.embeddings = (EmbeddingStore(folder, num_tiles, num_patches, rank=rank, num_ranks=num_ranks)
                           if embeddings is None else embeddings)
        if self.embeddings.shape != self.shape:
            raise ValueError(f"the embedding store holds {self.embeddings.shape} tiles x patches, not {self.shape}")
        self.logits = self._file("logits.f32", np.float32, num_queries)
        self.z = self._file("z.f32", np.float32, num_queries)
        self.resumed_from = self.state["next_tile"]  # tiles before it an earlier run already stored

    @property
    def features(self) -> TileFile | None:
        return self.embeddings.features

    @property
    def valid(self) -> TileFile:
        return self.embeddings.valid

    @property
    def clip(self) -> TileFile | None:
        return self.embeddings.clip

    @property
    def feature_dim(self) -> int | None:
        return self.embeddings.feature_dim

    def close(self) -> None:
        self.logits.close()
        self.z.close()
        if self._owns_embeddings:
            self.embeddings.close()

    def put(self, indices: Sequence[int], logits: np.ndarray, features: np.ndarray, valid: np.ndarray) -> None:
        """Store tiles' embeddings (recorded in the embedding store) and priors; :meth:`record` them after."""
        self.embeddings.put(indices, features, valid)
        self.embeddings.record(encoded=indices)
        self.put_prior(indices, logits)

    def put_prior(self, indices: Sequence[int], logits: np.ndarray) -> None:
        """Store tiles' priors (n, P, K); :meth:`record` them as encoded after."""
        self.logits[indices] = logits

    def commit(self, next_tile: int, empty: Sequence[int] = (), solved: bool | None = None) -> None:
        """The single writer's :meth:`record`: every tile before ``next_tile`` is stored, those in ``empty``
        (now or before) are empty; ``solved=True`` records every encoded tile as solved (context 0)."""
        empty = _checked(empty, self.shape[0])
        known_empty = empty | self._progress()["empty"]
        self.record(encoded=[tile for tile in range(next_tile) if tile not in known_empty], empty=empty)
        if solved:
            self.record(solved={0: sorted(self._progress()["encoded"])})

    def solved_contexts(self) -> dict[int, list[int]]:
        """Context id -> tiles of each solved context whose tiles are all still encoded from the same inputs."""
        progress = self._progress()
        return {context: entry["tiles"] for context, entry in sorted(progress["solved"].items())
                if progress["encoded"].issuperset(entry["tiles"])
                and entry["inputs"] == self._fingerprint(entry["tiles"])}

    @property
    def state(self) -> dict:
        """Progress in the single writer's terms: ``next_tile`` (the first missing tile, ``num_tiles`` when
        none), ``empty`` (sorted), ``feature_dim``, ``solved`` (every encoded tile lies in a solved context)."""
        missing = self.missing_tiles()
        covered = {tile for tiles in self.solved_contexts().values() for tile in tiles}
        solved = bool(covered) and covered.issuperset(self._progress()["encoded"])
        return {"version": STORE_VERSION, "next_tile": missing[0] if missing else self.shape[0],
                "empty": self.empty_tiles(), "feature_dim": self.feature_dim, "solved": solved}

    def verify(self, tiles: Iterable[int] | None = None) -> list[int]:
        """The damaged tiles among ``tiles`` (default: all) this store counts as encoded: their logits, features
        or validity, or (in a solved context) z, fail their checksums. Reads every such record once."""
        progress = self._progress()
        wanted = progress["encoded"] if tiles is None else progress["encoded"] & {int(t) for t in tiles}
        if not wanted:
            return []
        damaged = set(self.logits.damaged(wanted))
        unrecorded = wanted - self.embeddings._progress()["encoded"]
        damaged.update(unrecorded, self.embeddings.verify(wanted - unrecorded))
        solved = {tile for tiles in self.solved_contexts().values() for tile in tiles}
        damaged.update(self.z.damaged(wanted & solved))
        return sorted(damaged)

    def discard(self, tiles: Iterable[int]) -> None:
        """Make ``tiles`` missing again here and in the embedding store (call it while no writer is at work)."""
        tiles = list(tiles)
        super().discard(tiles)
        self.embeddings.discard(tiles)

    def _inputs(self) -> list[TileFile | None]:
        return [self.logits, self.valid, self.features]


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
