"""Scene passes: tiles -> embeddings -> priors -> context solver -> stitched blocks.

Four public passes, each bounded in memory by a tile batch or a band of tile rows, never the scene, and
composable (the :class:`~coninfer.segmenter.Segmenter` runs them in order; a multi-process run gives each its
share of tiles and the solver's ``reduce``/``gather`` hooks):

1. :func:`encode_scene` embeds the tiles the embedding store still lacks, in fixed groups of ``batch_size``
   tiles (row-major): dense CLIP tokens (T, G*G, E) float32, solver features (T, G*G, D) float16, patch
   validity. Nothing here depends on the classes. After each group the store records it, so a run killed at
   any point resumes at the first unfinished group and computes exactly the same numbers.
2. :func:`prior_scene` turns stored CLIP tokens into the class-dependent prior (T, G*G, K) of one query set:
   a matrix product, no encoder. A re-query with other classes reuses the embeddings and starts here.
3. :func:`solve_store` solves the chosen context: ``scene`` streams the store through the solver's
   sufficient-statistics API (one mixture over all tiles); ``batch`` fits groups of ``context_size`` tiles (the
   paper's setting); ``none`` (or the baseline method) keeps the prior. Patches less than half valid
   (:func:`patch_validity`) take no part in fitting; a context with fewer valid patches than ``init_topk`` (a
   sliver of data at the scene edge) keeps the prior.
4. :func:`stitch_scene` yields final blocks row band by row band, blending overlaps
   (:class:`~coninfer.raster.tiles.BandStitcher`).

Tiles are read through a :class:`TileReader`: a raster file (:func:`file_reader`) or an array in memory
(:func:`array_reader`), both returning (3, T, T) uint8 pixels and a (T, T) validity mask, padding past the edge.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from coninfer import _fs, distributed
from coninfer.distributed import Dist
from coninfer.errors import InputError, InputFileError, ResourceError
from coninfer.postprocess import Workspace, class_probabilities, patches_to_grid
from coninfer.raster.tiles import BandStitcher, StitchedBlock, TileGrid, read_ahead
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.solver import Gather, Reduce, assign, fit_context, prior_probabilities
from coninfer.tile_file import StoreCorruptError
from coninfer.tile_step import Models, embed_tiles, query_logits, segearth_ov_logits

logger = logging.getLogger(__name__)

TileReader = Callable[["Window"], tuple[np.ndarray, np.ndarray]]  # noqa: F821 - rasterio Window
"""``read(window) -> (rgb (3, h, w) uint8, valid (h, w) bool)``; parts past the scene edge are invalid zeros.

A reader may also carry ``read.validity(window) -> valid``, the same mask without the pixels: the stitch pass
needs only that, and for a file without masks :func:`file_reader` gives it without reading the file."""

STOP_AFTER_BATCHES_ENV = "CONINFER_STOP_AFTER_BATCHES"
STOP_SIGNAL_ENV = "CONINFER_STOP_SIGNAL"
"""Test hook: a run whose environment sets CONINFER_STOP_AFTER_BATCHES=N sends itself a signal (SIGKILL, or the
one named by CONINFER_STOP_SIGNAL, e.g. TERM or INT) after recording N encode batches, so kill-and-resume tests
are deterministic instead of racing a timer."""


@dataclass(frozen=True)
class ArrayScene:
    """An (H, W, 3) uint8 array (and optional (H, W) validity) as a scene for the in-memory path."""

    rgb: np.ndarray
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        rgb = self.rgb
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
            raise InputError(f"rgb must be a non-empty (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}",
                             hint="convert with np.asarray(image, dtype=np.uint8); a (3, H, W) array needs "
                                  "np.moveaxis(image, 0, -1)")
        if self.valid is not None and self.valid.shape != rgb.shape[:2]:
            raise InputError(f"valid must be (H, W) = {rgb.shape[:2]}, got {self.valid.shape}")

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


@contextmanager
def file_reader(scene) -> Iterator[TileReader]:
    """A :data:`TileReader` over a :class:`~coninfer.raster.read.Scene`, the file opened once; with its
    ``validity`` when the scene has no masks."""
    from rasterio.errors import RasterioError

    from coninfer.raster import read

    with scene.open() as src:
        def read_tile(window):
            try:
                return read.read_window(scene, window, src=src)
            except RasterioError as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise InputFileError(f"cannot read {scene.path} at pixel window {window.flatten()}: {reason}",
                                     hint="the file may be truncated or corrupt; check it with gdalinfo -checksum"
                                     ) from error

        if not scene.masked:
            read_tile.validity = partial(read.window_validity, scene)
        yield read_tile


@contextmanager
def array_reader(scene: ArrayScene) -> Iterator[TileReader]:
    """A :data:`TileReader` over an array: slices, zero-padded and invalid past the edge."""

    def read_tile(window):
        height, width = int(window.height), int(window.width)
        row0, col0 = int(window.row_off), int(window.col_off)
        rgb = np.zeros((3, height, width), np.uint8)
        valid = np.zeros((height, width), bool)
        rows = slice(max(row0, 0), min(row0 + height, scene.height))
        cols = slice(max(col0, 0), min(col0 + width, scene.width))
        if rows.start < rows.stop and cols.start < cols.stop:
            target = (slice(rows.start - row0, rows.stop - row0), slice(cols.start - col0, cols.stop - col0))
            # from (h, w, 3) -> (3, h, w)
            rgb[(slice(None), *target)] = np.moveaxis(scene.rgb[rows, cols], -1, 0)
            valid[target] = True if scene.valid is None else scene.valid[rows, cols]
            rgb[:, ~valid] = 0
        return rgb, valid

    yield read_tile


def scene_grid(width: int, height: int, options: SceneOptions) -> TileGrid:
    """The tile grid of a scene. A tile larger than the scene is the scene: ``--tile-size 100000`` on a
    300 x 300 scene is one 300 px tile, not a 100000² allocation (the overlap shrinks with it)."""
    tile_size = min(options.tile_size, max(16, width, height))
    overlap = min(options.overlap, max(0, (tile_size - 1) // 2))
    return TileGrid(width, height, tile_size, overlap)


def encode_scene(models: Models, settings: InferenceSettings, read_tile: TileReader, grid: TileGrid, embeddings, *,
                 batch_size: int, tiles: Sequence[int] | None = None, progress: bool = False) -> None:
    """Pass 1: the class-independent embeddings (CLIP tokens, solver features, patch validity) of ``tiles``
    (default: every tile) that the embedding store does not hold yet, in groups of ``batch_size`` tiles, each
    group recorded after its data; tiles without a valid pixel are recorded as empty, not encoded. A group is
    stored in a worker thread while the next one is read and encoded."""
    from tqdm import tqdm

    missing = set(embeddings.missing_tiles())
    todo = [index for index in (range(len(grid)) if tiles is None else tiles) if index in missing]
    side = models.grid_size(settings.model_res)
    stop_after = int(os.environ.get(STOP_AFTER_BATCHES_ENV, "0") or 0)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), unit="tile", disable=not progress, desc="encode",
               dynamic_ncols=True)
    encoder_batch = batch_size

    def store(kept: list[int], empty: list[int], encoded: tuple | None) -> None:
        if encoded is not None:
            clip, features, masks = encoded
            embeddings.put(kept, features, np.stack([patch_validity(mask, side) for mask in masks]), clip=clip)
        embeddings.record(encoded=kept, empty=empty)  # after the data: a kill in between leaves them missing

    writer = OneBehind("coninfer-store-write")
    try:
        for batch_number, (indices, kept, empty, pixels, masks) in enumerate(_read_batches(read_tile, grid, todo,
                                                                                            batch_size), start=1):
            encoded = None
            if pixels:
                clip, features, encoder_batch = encode_adaptive(models, settings, pixels, encoder_batch)
                encoded = (clip, features, masks)
            # stored in a worker thread while the next batch is encoded (pwrite and crc32 release the GIL)
            writer.submit(store, kept, empty, encoded)
            bar.update(len(indices))
            if stop_after and batch_number >= stop_after:
                writer.wait()  # the test hook: a kill at a known point, after N batches are recorded
                os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(STOP_SIGNAL_ENV, 'KILL')}"))
    finally:
        writer.close()
        bar.close()


class OneBehind:
    """Calls run in one worker thread, in order, at most one at a time behind the caller: :meth:`submit` first
    waits for the call before (so one batch's arrays at most wait in memory) and raises its error there;
    :meth:`close` waits for the last one (also when the caller fails: what was handed over is finished)."""

    def __init__(self, name: str) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future | None = None

    def submit(self, function: Callable, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(function, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _read_batches(read_tile: TileReader, grid: TileGrid, todo: list[int], batch_size: int) -> Iterator[tuple]:
    """``(indices, kept, empty, pixels, masks)`` per group of ``batch_size`` tiles of ``todo``: the tiles with
    valid pixels (kept, their (3, T, T) uint8 tensors and masks) and those without. The next group is read and
    decoded in a worker thread while the caller encodes this one (GDAL releases the GIL)."""
    reads = read_ahead(read_tile, (grid.window(index) for index in todo), depth=batch_size)
    try:
        for first in range(0, len(todo), batch_size):
            indices = todo[first : first + batch_size]
            kept, empty, pixels, masks = [], [], [], []
            for index in indices:
                rgb, valid = next(reads)
                if valid.any():
                    kept.append(index)
                    pixels.append(torch.from_numpy(rgb))
                    masks.append(valid)
                else:
                    empty.append(index)
            yield indices, kept, empty, pixels, masks
    finally:
        reads.close()


def encode_adaptive(models: Models, settings: InferenceSettings, tiles: list[torch.Tensor], batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Embed in sub-batches of ``batch_size``, halving it on CUDA out-of-memory; returns CLIP tokens (B, P, E)
    float32, features (B, P, D) float16 and the batch size that worked (kept for later groups).

    The features become float16, the store's type, where they are: half the bytes from a GPU, and on the CPU
    torch's conversion is ~10x numpy's astype (F16C); both round to nearest even, so the stored bits are those
    of the float32 features cast on the host."""
    while True:
        try:
            parts = [embed_tiles(models, tiles[i : i + batch_size], settings)
                     for i in range(0, len(tiles), batch_size)]
            clip = torch.cat([p[0] for p in parts]).float().cpu().numpy()
            features = torch.cat([p[1] for p in parts]).half().cpu().numpy()
            return clip, features, batch_size
        except torch.cuda.OutOfMemoryError as error:
            if batch_size == 1:
                raise ResourceError("the GPU ran out of memory even for one tile",
                                    hint="use a smaller --model-res, --precision fp16, or --device cpu") from error
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: continuing with --batch-size %d", batch_size)


def prior_scene(models: Models, settings: InferenceSettings, read_tile: TileReader, grid: TileGrid, store, *,
                batch_size: int, tiles: Sequence[int] | None = None, progress: bool = False) -> None:
    """Pass 2: the class-dependent prior (T, P, K) of every embedded tile the store lacks, in groups of
    ``batch_size`` tiles. The CLIP prior is computed from the stored CLIP tokens (no encoder runs: this is what
    makes a re-query with other classes fast); SegEarth-OV's needs the pixels and runs CLIP and SimFeatUp."""
    from tqdm import tqdm

    embedded_empty = set(store.embeddings.empty_tiles())
    missing = store.missing_tiles() if tiles is None else sorted(set(tiles) & set(store.missing_tiles()))
    store.record(empty=[tile for tile in missing if tile in embedded_empty])
    todo = [tile for tile in missing if tile not in embedded_empty]
    bar = tqdm(total=len(todo), unit="tile", disable=not progress or not todo, desc="prior", dynamic_ncols=True)
    for group in _groups(todo, batch_size):
        if settings.prior == "segearth-ov":
            pixels = [torch.from_numpy(read_tile(grid.window(index))[0]) for index in group]
            logits = segearth_ov_logits(models, pixels, settings)
        else:
            if store.clip is None:
                raise StoreCorruptError(store.embeddings.folder, "clip.f32 is missing")
            logits = query_logits(torch.from_numpy(store.clip[group]).to(models.device), models.query_embeddings)
        store.put_prior(group, logits.cpu().numpy())
        store.record(encoded=group)
        bar.update(len(group))
    bar.close()


def contexts_of(store, settings: InferenceSettings, options: SceneOptions) -> list[list[int]]:
    """The solver contexts (lists of non-empty tiles): one for ``scene`` and ``collection``, groups of
    ``context_size`` tiles for ``batch``, one tile each for ``none`` and the baseline method (the prior needs no
    context)."""
    empty = set(store.empty_tiles())
    tiles = [i for i in range(store.shape[0]) if i not in empty]
    if options.context == "none" or settings.method == "baseline":
        return [[tile] for tile in tiles]
    # a collection's store (coninfer.collection.CollectionStore) spans its scenes: one context, like a scene
    size = len(tiles) if options.context in ("scene", "collection") else options.context_size
    return list(_groups(tiles, size))


def solve_store(store, settings: InferenceSettings, options: SceneOptions, *, device: torch.device,
                reduce: Reduce | None = None, gather: Gather | None = None, dist: Dist | None = None) -> None:
    """Pass 3: z for every non-empty tile of the store, context by context (see the module docstring); each
    solved context is recorded, so a resumed run solves only the contexts still missing.

    ``dist`` (a multi-process run, :mod:`coninfer.distributed`; every rank calls this): the ``scene`` context
    is fitted by all ranks together, each over its share of whole chunks (the hooks all-reduce the sums in rank
    order); ``batch`` and ``none`` contexts are shared out whole, one rank each. Either way the numbers do not
    depend on the world size."""
    grouped = dist is not None and dist.world_size > 1
    prior_only = options.context == "none" or settings.method == "baseline"
    together = grouped and options.context in ("scene", "collection") and not prior_only
    solved = store.solved_contexts()
    chunk_tiles = options.solver_chunk_tiles
    init_topk = settings.solver.init_topk
    contexts = list(enumerate(contexts_of(store, settings, options)))
    if grouped and not together:
        contexts = distributed.split(dist, contexts)
    for number, context in contexts:
        if solved.get(number) == context:
            continue
        valid_patches = 0 if prior_only else sum(int(np.asarray(store.valid[group]).sum())
                                                 for group in _groups(context, chunk_tiles))
        if prior_only or valid_patches < init_topk:
            if not prior_only:  # the mixture needs init_topk patches to start from; a sliver keeps its prior
                logger.warning("%d tile(s) (%s) hold %d valid patches, fewer than init_topk=%d: they keep the "
                               "CLIP prior", len(context), _tile_range(context), valid_patches, init_topk)
            if not together or dist.is_main:
                keep_prior(store, context, settings, chunk_tiles)
        else:
            solve_context(store, context, settings, chunk_tiles, device=device, reduce=reduce, gather=gather,
                          dist=dist if together else None)
        if together:
            distributed.barrier(dist)  # every rank's share of z is written before the context counts as solved
        if not together or dist.is_main:
            store.record(solved={number: context})
    if grouped:
        distributed.barrier(dist)  # what comes next reads every rank's z and records


def keep_prior(store, tiles: Sequence[int], settings: InferenceSettings, chunk_tiles: int) -> None:
    """z = softmax(prior_scale * logits) for ``tiles`` (the ``none`` context and the baseline method)."""
    for group in _groups(tiles, chunk_tiles):
        logits = torch.from_numpy(np.asarray(store.logits[group]))
        store.z[group] = prior_probabilities(logits, settings.solver).numpy()


def solve_context(store, tiles: Sequence[int], settings: InferenceSettings, chunk_tiles: int, *,
                  device: torch.device, reduce: Reduce | None = None, gather: Gather | None = None,
                  dist: Dist | None = None) -> None:
    """One mixture over ``tiles`` (at least init_topk valid patches), streamed from the store in chunks of
    ``chunk_tiles``; z written back to the store. Only valid patches enter the fit; every patch gets z.

    With ``dist`` every rank fits over its contiguous share of whole chunks: the float32 block sums are then the
    single-process ones, and only the float64 sum across ranks is reassociated (in rank order)."""
    hooks = {name: hook for name, hook in (("reduce", reduce), ("gather", gather)) if hook is not None}
    num_queries = store.num_queries
    groups = list(_groups(tiles, chunk_tiles))
    grouped = dist is not None and dist.world_size > 1
    if grouped:
        groups = distributed.split(dist, groups)

    def fit_chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in groups:
            valid = np.asarray(store.valid[group]).astype(bool).reshape(-1)  # (n*P,)
            logits = np.asarray(store.logits[group]).reshape(-1, num_queries)[valid]
            features = np.asarray(store.features[group]).reshape(valid.shape[0], -1)[valid]
            if len(logits):
                yield torch.from_numpy(logits).to(device), torch.from_numpy(features).to(device)

    joint = settings.method != "decoupled"
    if grouped:
        fit = distributed.fit_share(dist, fit_chunks, settings.solver, joint=joint, device=device,
                                    num_patches=sum(int(np.asarray(store.valid[group]).sum()) for group in groups),
                                    num_queries=num_queries, num_features=int(store.features.shape[-1]))
    else:
        fit = fit_context(fit_chunks, settings.solver, joint=joint, **hooks)
    for group in groups:
        logits = torch.from_numpy(np.asarray(store.logits[group]).reshape(-1, num_queries)).to(device)
        features = torch.from_numpy(np.asarray(store.features[group]).reshape(logits.shape[0], -1)).to(device)
        z = assign(logits, features, fit.state, settings.solver)
        store.z[group] = z.cpu().numpy().reshape(len(group), -1, num_queries)


def stitch_scene(models: Models, settings: InferenceSettings, read_tile: TileReader, grid: TileGrid, store, *,
                 rows: range | None = None, progress: bool = False, probabilities: bool = True,
                 band_device: torch.device | None | str = "auto") -> Iterator[StitchedBlock]:
    """Pass 4: final blocks (window, labels, probs, valid) band by band, in row order. Each tile's validity is
    read again (one tile ahead, in a worker thread, while this one's probabilities are computed), or taken from
    the reader's ``validity`` where it has one (a file without masks: no read at all).

    ``rows`` (default: all): only the blocks that these tile rows finish, a rank's share of a multi-process
    stitch. The tiles of the row before are added first and their blocks dropped, so every pixel sums the same
    tiles in the same order as in a whole-scene pass: the blocks are bit for bit the same.

    ``probabilities`` False: the blocks carry ``probs=None`` (no output needs them). ``band_device``: where the
    stitcher's band lives; ``"auto"``: on the models' device when that is not the CPU (the tiles' probabilities
    then never leave it, only uint8 labels and validity come back, and the probabilities when asked), a numpy
    band on the CPU (faster there than torch's)."""
    from tqdm import tqdm

    rows = range(grid.n_rows) if rows is None else rows
    if not rows:
        return
    first_row = grid.warm_up_row(rows.start)
    tiles = range(first_row * grid.n_cols, rows.stop * grid.n_cols)
    side = models.grid_size(settings.model_res)
    empty = set(store.empty_tiles())
    if band_device == "auto":
        band_device = None if models.device.type == "cpu" else models.device
    stitcher = BandStitcher(grid, len(models.classes.names), first_row=first_row, device=band_device,
                            probabilities=probabilities)
    post = settings.post
    bar = tqdm(total=len(tiles), unit="tile", disable=not progress, desc="stitch", dynamic_ncols=True)

    workspace = Workspace()  # every tile has the same size: its buffers serve them all
    on_device = band_device is not None and torch.device(band_device) == models.device
    if not on_device and band_device is not None:
        raise ValueError(f"band_device {band_device} is not the models' device {models.device}")

    def tile_probabilities(index: int, valid: np.ndarray):
        """(C, T, T), written straight into the stitcher's band where it can take them (host: a numpy array;
        a band on the device: a tensor there)."""
        z = torch.from_numpy(store.z[index]).to(models.device)  # (P, K)
        target = stitcher.direct_target(index, valid) if on_device or models.device.type == "cpu" else None
        out = None if target is None else (target if on_device else torch.from_numpy(target))[None]
        probs = class_probabilities(patches_to_grid(z, side, side), (grid.tile_size, grid.tile_size),
                                    models.classes.query_to_class, post.logit_scale, out=out, workspace=workspace)
        if target is not None:
            return target
        return probs[0] if on_device else probs[0].cpu().numpy()

    reads = _validities(read_tile, (grid.window(index) for index in tiles if index not in empty))
    try:
        for index in tiles:
            probs = valid = None
            if index not in empty:
                valid = next(reads)
                probs = tile_probabilities(index, valid)
            # the warm-up row's blocks belong to the rank before: only its sums are needed
            yield from stitcher.add(index, probs, valid, prob_thd=post.prob_thd, bg_index=post.bg_index,
                                    emit=index // grid.n_cols in rows)
            bar.update(1)
    finally:
        reads.close()
        bar.close()


def _validities(read_tile: TileReader, windows: Iterable) -> Iterator[np.ndarray]:
    """The validity of each window, in order: the reader's ``validity`` if it has one, else its reads."""
    validity = getattr(read_tile, "validity", None)
    if validity is not None:
        yield from map(validity, windows)
        return
    reads = read_ahead(read_tile, windows)
    try:
        for _, valid in reads:
            yield valid
    finally:
        reads.close()


def spool_blocks(blocks: Iterable[StitchedBlock], path: Path) -> int:
    """Write ``blocks`` to ``path`` (raw labels, validity and float32 probabilities, block after block) and
    its index ``path.json`` last, atomically: a spool without its index is unfinished. Returns the count.

    A multi-process stitch spools each rank's band in the work folder; rank 0 reads the bands back in order
    (:func:`read_spooled`) into the single writers of the outputs. Disk: (1 + 1 + 4 C) bytes per pixel, removed
    after the outputs are written."""
    entries = []
    with open(path, "wb") as file:
        for block in blocks:
            window = block.window
            entries.append([int(window.col_off), int(window.row_off), int(window.width), int(window.height)])
            for array in (block.labels.astype(np.uint8, copy=False), block.valid.astype(np.uint8, copy=False),
                          block.probs.astype(np.float32, copy=False)):
                file.write(np.ascontiguousarray(array).tobytes())
    _fs.atomic_write_text(path.with_name(path.name + ".json"), json.dumps({"blocks": entries}))
    return len(entries)


def read_spooled(paths: Sequence[Path], num_classes: int) -> Iterator[StitchedBlock]:
    """The blocks of the spools ``paths`` (written by :func:`spool_blocks`), in order, one block in memory."""
    from rasterio.windows import Window

    for path in paths:
        index = path.with_name(path.name + ".json")
        try:
            entries = json.loads(index.read_text())["blocks"]
        except (OSError, ValueError, KeyError) as error:
            raise StoreCorruptError(path.parent, f"the stitch spool {index.name} is missing or damaged ({error})") \
                from error
        with open(path, "rb") as file:
            for col, row, width, height in entries:
                area = width * height
                labels, valid = np.fromfile(file, np.uint8, area), np.fromfile(file, np.uint8, area)
                probs = np.fromfile(file, np.float32, num_classes * area)
                if probs.size != num_classes * area:  # a short read leaves the later arrays short
                    raise StoreCorruptError(path.parent, f"the stitch spool {path.name} is shorter than its index")
                yield StitchedBlock(window=Window(col, row, width, height), labels=labels.reshape(height, width),
                                    probs=probs.reshape(num_classes, height, width),
                                    valid=valid.reshape(height, width).astype(bool))


def patch_validity(valid: np.ndarray, side: int) -> np.ndarray:
    """(side*side,) uint8: 1 where at least half of the patch's source pixels are valid."""
    if valid.all():  # every patch fully valid (the usual tile): no counting needed
        return np.ones(side * side, np.uint8)
    height, width = valid.shape
    rows = np.minimum((np.arange(height) * side) // height, side - 1)
    cols = np.minimum((np.arange(width) * side) // width, side - 1)
    flat = (rows[:, None] * side + cols[None, :]).ravel()
    total = np.bincount(flat, minlength=side * side)
    good = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=side * side)
    return (good * 2 >= total).astype(np.uint8)


class _MemoryRecords:
    """Progress records in memory (the in-memory path: no files, nothing to resume)."""

    def __init__(self, num_tiles: int, num_patches: int) -> None:
        self.shape = (num_tiles, num_patches)
        self.resumed_from = 0
        self._done: set[int] = set()
        self._empty: set[int] = set()
        self._solved: dict[int, list[int]] = {}

    def record(self, *, encoded: Sequence[int] = (), empty: Sequence[int] = (),
               solved: dict[int, list[int]] | None = None) -> None:
        self._done.update(encoded)
        self._empty.update(empty)
        self._solved.update(solved or {})

    def missing_tiles(self) -> list[int]:
        return [tile for tile in range(self.shape[0]) if tile not in self._done | self._empty]

    def empty_tiles(self) -> list[int]:
        return sorted(self._empty)

    def solved_contexts(self) -> dict[int, list[int]]:
        return dict(self._solved)

    def close(self) -> None:
        """Nothing to release: the arrays go with the store (the file stores' interface has close())."""


class MemoryEmbeddings(_MemoryRecords):
    """:class:`~coninfer.store.EmbeddingStore`'s interface over arrays in memory."""

    def __init__(self, num_tiles: int, num_patches: int) -> None:
        super().__init__(num_tiles, num_patches)
        self.valid = np.zeros((num_tiles, num_patches), np.uint8)
        self.clip: np.ndarray | None = None
        self.features: np.ndarray | None = None

    def put(self, indices: Sequence[int], features: np.ndarray, valid: np.ndarray, clip: np.ndarray | None = None
            ) -> None:
        if self.features is None:  # float16 like the disk store's, so both paths give the same numbers
            self.features = np.zeros((*self.shape, features.shape[-1]), np.float16)
        if clip is not None:
            if self.clip is None:
                self.clip = np.zeros((*self.shape, clip.shape[-1]), np.float32)
            self.clip[indices] = clip
        self.features[indices], self.valid[indices] = features, valid


class MemoryStore(_MemoryRecords):
    """:class:`~coninfer.store.TileStore`'s interface over arrays in memory, reading ``embeddings``."""

    def __init__(self, num_tiles: int, num_patches: int, num_queries: int,
                 embeddings: MemoryEmbeddings | None = None) -> None:
        super().__init__(num_tiles, num_patches)
        self.num_queries = num_queries
        self.embeddings = embeddings if embeddings is not None else MemoryEmbeddings(num_tiles, num_patches)
        self.logits = np.zeros((num_tiles, num_patches, num_queries), np.float32)
        self.z = np.zeros_like(self.logits)

    @property
    def features(self) -> np.ndarray | None:
        return self.embeddings.features

    @property
    def valid(self) -> np.ndarray:
        return self.embeddings.valid

    @property
    def clip(self) -> np.ndarray | None:
        return self.embeddings.clip

    def put_prior(self, indices: Sequence[int], logits: np.ndarray) -> None:
        self.logits[indices] = logits

    def put(self, indices: Sequence[int], logits: np.ndarray, features: np.ndarray, valid: np.ndarray) -> None:
        self.embeddings.put(indices, features, valid)
        self.embeddings.record(encoded=indices)
        self.put_prior(indices, logits)


def _tile_range(tiles: Sequence[int]) -> str:
    return str(tiles[0]) if len(tiles) == 1 else f"{tiles[0]}..{tiles[-1]}"


def _groups(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
