"""Scene passes: tiles -> store of priors and features -> context solver -> stitched blocks.

Three public passes, each bounded in memory by a tile batch or a band of tile rows, never the scene, and
composable (the :class:`~coninfer.segmenter.Segmenter` runs them in order; a multi-process run gives each its
share of tiles and the solver's ``reduce``/``gather`` hooks):

1. :func:`encode_scene` encodes the tiles the store still lacks, in fixed groups of ``batch_size`` tiles
   (row-major): CLIP logits (T, G*G, K) float32, features (T, G*G, D) float16, patch validity. After each
   group the store commits, so a run killed at any point resumes at the first unfinished group and computes
   exactly the same numbers.
2. :func:`solve_store` solves the chosen context: ``scene`` streams the store through the solver's
   sufficient-statistics API (one mixture over all tiles); ``batch`` fits groups of ``context_size`` tiles (the
   paper's setting); ``none`` (or the baseline method) keeps the prior. Patches less than half valid
   (:func:`patch_validity`) take no part in fitting; a context with fewer valid patches than ``init_topk`` (a
   sliver of data at the scene edge) keeps the prior.
3. :func:`stitch_scene` yields final blocks row band by row band, blending overlaps
   (:class:`~coninfer.raster.tiles.BandStitcher`).

Tiles are read through a :class:`TileReader`: a raster file (:func:`file_reader`) or an array in memory
(:func:`array_reader`), both returning (3, T, T) uint8 pixels and a (T, T) validity mask, padding past the edge.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from coninfer.errors import InputError, InputFileError, ResourceError
from coninfer.postprocess import class_probabilities, patches_to_grid
from coninfer.raster.tiles import BandStitcher, StitchedBlock, TileGrid
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.solver import Gather, Reduce, assign, fit_context, prior_probabilities
from coninfer.tile_step import Models, encode_tiles

logger = logging.getLogger(__name__)

TileReader = Callable[["Window"], tuple[np.ndarray, np.ndarray]]  # noqa: F821 - rasterio Window
"""``read(window) -> (rgb (3, h, w) uint8, valid (h, w) bool)``; parts past the scene edge are invalid zeros."""

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
    """A :data:`TileReader` over a :class:`~coninfer.raster.read.Scene`, the file opened once."""
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


def encode_scene(models: Models, settings: InferenceSettings, read_tile: TileReader, grid: TileGrid, store, *,
                 batch_size: int, tiles: Sequence[int] | None = None, progress: bool = False) -> None:
    """Pass 1: encode ``tiles`` (default: every tile) that the store does not hold yet, in groups of
    ``batch_size`` tiles, recording each group after its data; tiles without a valid pixel are recorded as
    empty, not encoded."""
    from tqdm import tqdm

    missing = set(store.missing_tiles())
    todo = [index for index in (range(len(grid)) if tiles is None else tiles) if index in missing]
    side = models.grid_size(settings.model_res)
    stop_after = int(os.environ.get(STOP_AFTER_BATCHES_ENV, "0") or 0)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), unit="tile", disable=not progress, desc="encode",
               dynamic_ncols=True)
    encoder_batch = batch_size
    for batch_number, first in enumerate(range(0, len(todo), batch_size), start=1):
        indices = todo[first : first + batch_size]
        pixels, kept, empty, masks = [], [], [], []
        for index in indices:
            rgb, valid = read_tile(grid.window(index))
            if not valid.any():
                empty.append(index)
                continue
            pixels.append(torch.from_numpy(rgb))
            kept.append(index)
            masks.append(valid)
        if pixels:
            logits, features, encoder_batch = encode_adaptive(models, settings, pixels, encoder_batch)
            store.put(kept, logits, features, np.stack([patch_validity(mask, side) for mask in masks]))
        store.record(encoded=kept, empty=empty)
        bar.update(len(indices))
        if stop_after and batch_number >= stop_after:
            # the test hook: a kill at a known point
            os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(STOP_SIGNAL_ENV, 'KILL')}"))
    bar.close()


def encode_adaptive(models: Models, settings: InferenceSettings, tiles: list[torch.Tensor], batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode in sub-batches of ``batch_size``, halving it on CUDA out-of-memory; returns logits (B, P, K)
    float32, features (B, P, D) float32 and the batch size that worked (kept for later groups)."""
    while True:
        try:
            parts = [encode_tiles(models, tiles[i : i + batch_size], settings)
                     for i in range(0, len(tiles), batch_size)]
            logits = torch.cat([p[0] for p in parts]).cpu().numpy()
            features = torch.cat([p[1] for p in parts]).float().cpu().numpy()
            return logits, features, batch_size
        except torch.cuda.OutOfMemoryError as error:
            if batch_size == 1:
                raise ResourceError("the GPU ran out of memory even for one tile",
                                    hint="use a smaller --model-res, --precision fp16, or --device cpu") from error
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: continuing with --batch-size %d", batch_size)


def contexts_of(store, settings: InferenceSettings, options: SceneOptions) -> list[list[int]]:
    """The solver contexts (lists of non-empty tiles): one for ``scene``, groups of ``context_size`` tiles for
    ``batch``, one tile each for ``none`` and the baseline method (the prior needs no context)."""
    empty = set(store.empty_tiles())
    tiles = [i for i in range(store.shape[0]) if i not in empty]
    if options.context == "none" or settings.method == "baseline":
        return [[tile] for tile in tiles]
    size = len(tiles) if options.context == "scene" else options.context_size
    return list(_groups(tiles, size))


def solve_store(store, settings: InferenceSettings, options: SceneOptions, *, device: torch.device,
                reduce: Reduce | None = None, gather: Gather | None = None) -> None:
    """Pass 2: z for every non-empty tile of the store, context by context (see the module docstring); each
    solved context is recorded, so a resumed run solves only the contexts still missing."""
    solved = store.solved_contexts()
    chunk_tiles = options.solver_chunk_tiles
    prior_only = options.context == "none" or settings.method == "baseline"
    init_topk = settings.solver.init_topk
    for number, context in enumerate(contexts_of(store, settings, options)):
        if solved.get(number) == context:
            continue
        valid_patches = 0 if prior_only else sum(int(np.asarray(store.valid[group]).sum())
                                                 for group in _groups(context, chunk_tiles))
        if prior_only:
            keep_prior(store, context, settings, chunk_tiles)
        elif valid_patches < init_topk:
            # the mixture needs init_topk patches to start from; a sliver of data keeps its prior instead
            logger.warning("%d tile(s) (%s) hold %d valid patches, fewer than init_topk=%d: they keep the "
                           "CLIP prior", len(context), _tile_range(context), valid_patches, init_topk)
            keep_prior(store, context, settings, chunk_tiles)
        else:
            solve_context(store, context, settings, chunk_tiles, device=device, reduce=reduce, gather=gather)
        store.record(solved={number: context})


def keep_prior(store, tiles: Sequence[int], settings: InferenceSettings, chunk_tiles: int) -> None:
    """z = softmax(prior_scale * logits) for ``tiles`` (the ``none`` context and the baseline method)."""
    for group in _groups(tiles, chunk_tiles):
        logits = torch.from_numpy(np.asarray(store.logits[group]))
        store.z[group] = prior_probabilities(logits, settings.solver).numpy()


def solve_context(store, tiles: Sequence[int], settings: InferenceSettings, chunk_tiles: int, *,
                  device: torch.device, reduce: Reduce | None = None, gather: Gather | None = None) -> None:
    """One mixture over ``tiles`` (at least init_topk valid patches), streamed from the store in chunks of
    ``chunk_tiles``; z written back to the store. Only valid patches enter the fit; every patch gets z."""
    hooks = {name: hook for name, hook in (("reduce", reduce), ("gather", gather)) if hook is not None}
    num_queries = store.num_queries

    def fit_chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in _groups(tiles, chunk_tiles):
            valid = np.asarray(store.valid[group]).astype(bool).reshape(-1)  # (n*P,)
            logits = np.asarray(store.logits[group]).reshape(-1, num_queries)[valid]
            features = np.asarray(store.features[group]).reshape(valid.shape[0], -1)[valid]
            if len(logits):
                yield torch.from_numpy(logits).to(device), torch.from_numpy(features).to(device)

    fit = fit_context(fit_chunks, settings.solver, joint=settings.method != "decoupled", **hooks)
    for group in _groups(tiles, chunk_tiles):
        logits = torch.from_numpy(np.asarray(store.logits[group]).reshape(-1, num_queries)).to(device)
        features = torch.from_numpy(np.asarray(store.features[group]).reshape(logits.shape[0], -1)).to(device)
        z = assign(logits, features, fit.state, settings.solver)
        store.z[group] = z.cpu().numpy().reshape(len(group), -1, num_queries)


def stitch_scene(models: Models, settings: InferenceSettings, read_tile: TileReader, grid: TileGrid, store, *,
                 progress: bool = False) -> Iterator[StitchedBlock]:
    """Pass 3: final blocks (window, labels, probs, valid) band by band, in row order."""
    from tqdm import tqdm

    side = models.grid_size(settings.model_res)
    empty = set(store.empty_tiles())
    stitcher = BandStitcher(grid, len(models.classes.names))
    post = settings.post
    bar = tqdm(total=len(grid), unit="tile", disable=not progress, desc="stitch", dynamic_ncols=True)
    for index in range(len(grid)):
        probs = valid = None
        if index not in empty:
            z = torch.from_numpy(store.z[index]).to(models.device)  # (P, K)
            probs = class_probabilities(patches_to_grid(z, side, side), (grid.tile_size, grid.tile_size),
                                        models.classes.query_to_class, post.logit_scale)[0].cpu().numpy()
            _, valid = read_tile(grid.window(index))
        yield from stitcher.add(index, probs, valid, prob_thd=post.prob_thd, bg_index=post.bg_index)
        bar.update(1)
    bar.close()


def patch_validity(valid: np.ndarray, side: int) -> np.ndarray:
    """(side*side,) uint8: 1 where at least half of the patch's source pixels are valid."""
    height, width = valid.shape
    rows = np.minimum((np.arange(height) * side) // height, side - 1)
    cols = np.minimum((np.arange(width) * side) // width, side - 1)
    flat = (rows[:, None] * side + cols[None, :]).ravel()
    total = np.bincount(flat, minlength=side * side)
    good = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=side * side)
    return (good * 2 >= total).astype(np.uint8)


class MemoryStore:
    """The tile store's interface over arrays in memory (the in-memory path: no files, nothing to resume)."""

    def __init__(self, num_tiles: int, num_patches: int, num_queries: int) -> None:
        self.shape = (num_tiles, num_patches)
        self.num_queries = num_queries
        self.logits = np.zeros((num_tiles, num_patches, num_queries), np.float32)
        self.z = np.zeros_like(self.logits)
        self.valid = np.zeros((num_tiles, num_patches), np.uint8)
        self.features: np.ndarray | None = None
        self.resumed_from = 0
        self._done: set[int] = set()
        self._empty: set[int] = set()
        self._solved: dict[int, list[int]] = {}

    def put(self, indices: Sequence[int], logits: np.ndarray, features: np.ndarray, valid: np.ndarray) -> None:
        if self.features is None:  # float16 like the disk store's, so both paths give the same numbers
            self.features = np.zeros((*self.shape, features.shape[-1]), np.float16)
        self.logits[indices], self.features[indices], self.valid[indices] = logits, features, valid

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
        """Nothing to release: the arrays go with the store (the file store's interface has close())."""


def _tile_range(tiles: Sequence[int]) -> str:
    return str(tiles[0]) if len(tiles) == 1 else f"{tiles[0]}..{tiles[-1]}"


def _groups(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
