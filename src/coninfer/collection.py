"""Many scenes in one run: inputs (files, folders, VRTs), one output set per input, scenes over ranks, and the
``collection`` context (one mixture over every tile of every input).

:func:`expand_inputs` turns the command line into raster inputs (a folder is its rasters, sorted by name);
:func:`plan_scenes` names every input's outputs in one folder (``<stem>.tif`` plus the kinds asked for, from
name templates holding ``{stem}``) and checks all of them before any work. :func:`share_scenes` decides how the
scenes go over the ranks of a torch.distributed run: whole scenes per rank when there are at least as many scenes
as ranks (1,000 small files on 8 GPUs keep all 8 busy, no collective per scene), else every rank on every scene's
tiles (a few large scenes). :class:`CollectionStore` is one store over the stores of several scenes, tiles in
input order, so :func:`coninfer.pipeline.solve_store` fits one mixture over all of them unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np

from coninfer import distributed
from coninfer._fs import is_virtual_path
from coninfer.errors import ConInferError, InputError, InputFileError, ResourceError
from coninfer.outputs import KINDS, check_outputs

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
"""What a folder given as input contributes: its files with these suffixes (any case), not its subfolders."""
STEM = "{stem}"
"""The placeholder of output name templates: the input's file name without its suffix."""
CLASS_MAP_TEMPLATE = STEM + ".tif"
T = TypeVar("T")


def expand_inputs(paths: Sequence[str | Path]) -> list[str | Path]:
    """The raster inputs named by ``paths``, in order: a local folder is replaced by its rasters
    (:data:`RASTER_SUFFIXES`, sorted by name, not recursive); files, VRTs and GDAL paths (URLs, ``/vsi…``) are
    kept as they are (a VRT is one input: GDAL mosaics its sources)."""
    if isinstance(paths, (str, Path)):  # one path, not a sequence of its characters
        paths = [paths]
    if not paths:
        raise InputError("no input given", hint="pass one or more rasters or folders of rasters")
    inputs: list[str | Path] = []
    for path in paths:
        if is_virtual_path(path) or not Path(path).is_dir():
            inputs.append(str(path) if is_virtual_path(path) else Path(path))
            continue
        rasters = sorted((child for child in Path(path).iterdir()
                          if child.suffix.lower() in RASTER_SUFFIXES and child.is_file()), key=lambda p: p.name)
        if not rasters:
            raise InputFileError(f"folder {path} holds no raster ({', '.join(RASTER_SUFFIXES)})",
                                 hint="pass a folder of rasters, or the files themselves (subfolders are not read)")
        inputs.extend(rasters)
    return inputs


def input_stem(path: str | Path) -> str:
    """The name an input's outputs are called by: its file name without the suffix (``a.tif`` -> ``a``; for a
    URL, the last part of its path)."""
    text = str(path).split("?", 1)[0].rstrip("/")
    return PurePosixPath(text).stem or text


@dataclass(frozen=True)
class ScenePlan:
    """One input of a run: ``index`` (input order), ``source``, ``stem``, its checked ``outputs`` by kind (as
    :func:`coninfer.outputs.check_outputs` returns them) and ``skipped`` (every output exists and the run was
    asked to skip such inputs)."""

    index: int
    source: str | Path
    stem: str
    outputs: dict[str, Path]
    skipped: bool = False

    @property
    def requested(self) -> dict[str, Path]:
        """The outputs to pass to ``segment_file``: the class map and the kinds asked for (not the sidecars)."""
        return {name: path for name, path in self.outputs.items() if KINDS[name].derived is None}


def plan_scenes(inputs: Sequence[str | Path], output_dir: str | Path, templates: Mapping[str, str | None], *,
                overwrite: bool = False, skip_existing: bool = False) -> list[ScenePlan]:
    """Every input's outputs in ``output_dir``: the class map ``<stem>.tif`` (or ``templates["class_map"]``), the
    report ``<stem>.json`` and one file per other kind in ``templates`` (kind -> name holding ``{stem}``, e.g.
    ``probabilities="{stem}_probs.tif"``; a name that is absolute stays outside ``output_dir``). All are checked
    before any work: one line for a template without ``{stem}``, two inputs of one stem, an output that exists
    (without ``overwrite``; with ``skip_existing`` an input whose outputs all exist is skipped instead)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        hint = "give a folder for the outputs" if folder.exists() else f"create it first: mkdir -p {folder}"
        raise InputError(f"--output-dir {folder} is not a folder" if folder.exists()
                         else f"--output-dir {folder} does not exist", hint=hint)
    given = {"class_map": CLASS_MAP_TEMPLATE, **{name: value for name, value in templates.items() if value}}
    for name, template in given.items():
        if name not in KINDS or KINDS[name].derived is not None:
            kinds = ", ".join(kind for kind in KINDS if not KINDS[kind].derived)
            raise InputError(f"unknown output kind {name!r}", hint=f"use {kinds}")
        if STEM not in str(template):
            example = f"{STEM}_{name}{(KINDS[name].suffixes or ('',))[0]}"
            raise InputError(f"{KINDS[name].option} {template}: with --output-dir an output name needs {STEM}, "
                             "which each input replaces by its own name",
                             hint=f"e.g. {KINDS[name].option} {example}")
    seen: dict[str, str | Path] = {}
    for source in inputs:
        stem = input_stem(source)
        if stem in seen:
            raise InputError(f"inputs {seen[stem]} and {source} share the name {stem!r}: their outputs in {folder} "
                             "would overwrite each other", hint="rename one of them, or run them with separate "
                                                               "--output-dir folders")
        seen[stem] = source
    plans = []
    for index, (stem, source) in enumerate(seen.items()):
        named = {name: folder / str(template).replace(STEM, stem) for name, template in given.items()}
        if "report" not in named:
            named["report"] = named["class_map"].with_suffix(".json")
        skipped = skip_existing and _all_exist(source, named)
        plans.append(ScenePlan(index, source, stem, check_outputs(source, named, overwrite=overwrite or skipped),
                               skipped))
    everything = [path.resolve() for plan in plans for path in plan.outputs.values()]
    if len(set(everything)) != len(everything):  # e.g. an absolute template without {stem} in its folder part
        raise InputError("two inputs' outputs share one path", hint=f"give each output name {STEM}")
    return plans


def _all_exist(source, named: dict[str, Path]) -> bool:
    outputs = check_outputs(source, named, overwrite=True)
    return all(path.exists() for path in outputs.values())


@dataclass(frozen=True)
class SceneShare:
    """How a run's scenes go over its ranks: ``whole`` (each rank runs its contiguous share of whole scenes
    alone, with world-size-1 semantics) or not (every rank works on every scene's tiles); ``mine``: the
    indexes (into the run's scene list) of the scenes this rank opens, encodes, stitches and writes."""

    whole: bool
    mine: list[int]
    store_dist: distributed.Dist


def share_scenes(count: int, dist: distributed.Dist) -> SceneShare:
    """Whole scenes per rank when there are at least as many scenes as ranks; else every rank on every scene
    (the scene-level distribution), so a few large scenes still use every rank."""
    if dist.grouped and dist.world_size > 1 and count >= dist.world_size:
        return SceneShare(True, distributed.split(dist, list(range(count))), alone(dist))
    return SceneShare(False, list(range(count)), dist)


def alone(dist: distributed.Dist) -> distributed.Dist:
    """This process as a world of one (same device): what a rank running whole scenes passes to the passes."""
    return distributed.Dist(device=dist.device)


class RankError(ConInferError, RuntimeError):
    """Another rank of the run stopped with an error; this one stops too (one line naming the rank)."""


def agree(dist: distributed.Dist, work: Callable[[], T], *, error: BaseException | None = None) -> list[T]:
    """``work()`` on every rank, then every rank's result in rank order; if any rank failed (``work`` raised,
    or ``error`` is given), every rank raises: the failing rank its own error, the others one line naming the
    first failing rank and its message, so no rank waits for a collective the failing one never reaches."""
    result, failure = None, error
    if failure is None:
        try:
            result = work()
        except Exception as raised:  # noqa: BLE001 - it is raised again below, on every rank
            failure = raised
    if not dist.grouped:
        if failure is not None:
            raise failure
        return [result]
    message = None if failure is None else str(failure) or type(failure).__name__
    gathered = distributed.all_gather_object(dist, (result, message))
    if failure is not None:
        raise failure
    for rank, (_, other) in enumerate(gathered):
        if other is not None:
            raise RankError(f"rank {rank} stopped: {other}")
    return [value for value, _ in gathered]


def raise_open_file_limit(needed: int) -> None:
    """Raise this process's soft limit of open files to ``needed`` (within the hard limit): a run holds a lock
    file per output and a lock per work folder of every scene until its end."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ResourceError(f"this run holds about {needed} files open (locks on every scene's outputs and work "
                            f"folder) but the limit is {hard}",
                            hint="raise it (ulimit -n) or split the inputs into several runs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass(frozen=True)
class StorePart:
    """One scene's store in a :class:`CollectionStore`: its embeddings folder, query folder and tile count."""

    folder: Path
    queries: Path
    num_tiles: int


class CollectionStore:
    """The stores of several scenes as one store of their tiles in order (scene 0's tiles, then scene 1's...),
    for :func:`coninfer.pipeline.solve_store`: ``valid``, ``logits``, ``features`` and ``z`` read and write
    through each scene's :class:`~coninfer.store.TileStore`; at most ``max_open`` of them are open at a time
    (a thousand scenes must not hold ten thousand files).

    Solved contexts are not recorded: the collection's one context spans the stores, none of which could say
    whether the others changed; the solve runs again on every run (the encoders, the cost, are resumed)."""

    def __init__(self, parts: Sequence[StorePart], num_patches: int, num_queries: int, *, max_open: int = 32) -> None:
        from coninfer.store import EmbeddingStore, TileStore

        self.parts = list(parts)
        self.num_queries = num_queries
        self.offsets = np.cumsum([0] + [part.num_tiles for part in self.parts])
        self.shape = (int(self.offsets[-1]), num_patches)
        self.resumed_from = 0
        self._max_open = max(1, max_open)
        self._open: OrderedDict[int, TileStore] = OrderedDict()

        def open_part(index: int) -> TileStore:
            part = self.parts[index]
            embeddings = EmbeddingStore(part.folder, part.num_tiles, num_patches)
            return TileStore(part.queries, part.num_tiles, num_patches, num_queries, embeddings=embeddings)

        self._open_part = open_part
        empty, dims = [], []
        for index in range(len(self.parts)):
            store = self.store(index)
            empty += [int(self.offsets[index]) + tile for tile in store.empty_tiles()]
            dims.append(store.feature_dim)
        self._empty = sorted(empty)
        self._feature_dim = next((dim for dim in dims if dim), None)
        self.valid, self.logits, self.z = _Column(self, "valid", ()), _Column(self, "logits", (num_queries,)), \
            _Column(self, "z", (num_queries,))
        self.features = None if self._feature_dim is None else _Column(self, "features", (self._feature_dim,))

    def store(self, index: int):
        """Scene ``index``'s TileStore, opened if needed (the least recently used one closed beyond max_open)."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        while len(self._open) >= self._max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
            oldest.embeddings.close()
        self._open[index] = self._open_part(index)
        return self._open[index]

    def locate(self, tiles: Sequence[int]) -> list[tuple[int, list[int], slice]]:
        """``tiles`` (collection indexes) as runs ``(scene, local tiles, positions in tiles)``, in order."""
        tiles = np.asarray(tiles, np.int64).reshape(-1)
        if tiles.size and (tiles.min() < 0 or tiles.max() >= self.shape[0]):
            raise IndexError(f"tiles outside 0..{self.shape[0] - 1}")
        scenes = np.searchsorted(self.offsets, tiles, side="right") - 1
        runs, start = [], 0
        for stop in range(1, len(tiles) + 1):
            if stop == len(tiles) or scenes[stop] != scenes[start]:
                scene = int(scenes[start])
                runs.append((scene, [int(t) - int(self.offsets[scene]) for t in tiles[start:stop]],
                             slice(start, stop)))
                start = stop
        return runs

    def empty_tiles(self) -> list[int]:
        return list(self._empty)

    def solved_contexts(self) -> dict[int, list[int]]:
        return {}

    def record(self, *, encoded: Sequence[int] = (), empty: Sequence[int] = (),
               solved: Mapping[int, Sequence[int]] | None = None) -> None:
        """Nothing to record: see the class docstring (the scenes' stores hold their own encode records)."""
        if encoded or empty:
            raise ValueError("a collection records no tiles: encode each scene's store")

    @property
    def feature_dim(self) -> int | None:
        return self._feature_dim

    def close(self) -> None:
        while self._open:
            _, store = self._open.popitem()
            store.close()
            store.embeddings.close()


class _Column:
    """One array (``valid``, ``logits``, ``features`` or ``z``) of a :class:`CollectionStore`, indexed by lists of
    collection tiles like a :class:`~coninfer.tile_file.TileFile`."""

    def __init__(self, collection: CollectionStore, name: str, channels: tuple[int, ...]) -> None:
        self.collection, self.name = collection, name
        self.shape = (*collection.shape, *channels)

    def _array(self, scene: int):
        array = getattr(self.collection.store(scene), self.name)
        if array is None:
            raise InputError(f"the work folder {self.collection.parts[scene].folder} holds no {self.name}",
                             hint="pass --no-resume to encode it again")
        return array

    def __getitem__(self, tiles: Sequence[int]) -> np.ndarray:
        parts = [self._array(scene)[local] for scene, local, _ in self.collection.locate(tiles)]
        if not parts:
            return np.zeros((0, *self.shape[1:]), np.float32)
        return np.concatenate(parts)

    def __setitem__(self, tiles: Sequence[int], values: np.ndarray) -> None:
        values = np.asarray(values).reshape(len(tiles), *self.shape[1:])
        for scene, local, positions in self.collection.locate(tiles):
            self._array(scene)[local] = values[positions]


def summary_line(report: dict) -> str:
    """One line per scene for stdout: the class map written, tiles, seconds, and the largest classes."""
    if report.get("skipped"):
        return f"skipped {report['input']}: its outputs exist (--skip-existing)"
    classes = sorted(report["classes"], key=lambda row: -row["pixels"])
    shares = ", ".join(f"{row['class_name']} {100 * row['fraction']:.1f}%" for row in classes[:4] if row["pixels"])
    return (f"wrote {report['outputs']['class_map']} ({report['tiles']['total']} tiles, "
            f"{report['timings_s']['total_s']:.1f} s): {shares or 'no valid pixel'}")
