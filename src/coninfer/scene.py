"""Whole scenes: windowed tiles -> on-disk store of priors and features -> context solver -> stitched outputs.

Three passes over a scene, each bounded in memory by a tile batch or a band of tile rows, never the scene:

1. **Encode** every non-empty tile (row-major, in fixed groups of ``batch_size`` tiles) into an on-disk
   store in the work directory: CLIP logits (T, G*G, K) float32, features (T, G*G, D) float16, patch validity.
   After each group the tiles are written and ``state.json`` is replaced atomically, so a run killed at any
   point resumes at the first unfinished group and computes exactly the same numbers.
2. **Solve** the chosen context: ``scene`` streams the store through the solver's sufficient-statistics API
   (one mixture over all tiles); ``batch`` fits groups of ``context_size`` tiles (the paper's setting);
   ``none`` keeps the prior. Patches less than half valid (nodata) take no part in fitting; a context with
   fewer valid patches than the solver's ``init_topk`` (a sliver of data at the scene edge) keeps the prior.
3. **Stitch** tile probabilities row band by row band (:class:`~coninfer.raster.tiles.BandStitcher`), blending
   overlaps, and write the class map / probabilities window by window, then vectors, preview and report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from coninfer.errors import InputError, InputFileError, OutputError, ResourceError
from coninfer.postprocess import class_probabilities, patches_to_grid
from coninfer.prompts import ClassList, default_cache_dir
from coninfer.raster import read, write
from coninfer.raster.tiles import NODATA_LABEL, BandStitcher, TileGrid
from coninfer.settings import DenseCLIPSettings, InferenceSettings, SceneOptions
from coninfer.solver import assign, fit_context
from coninfer.store import STORE_VERSION, TileStore, clear_folder, locked_folder
from coninfer.tile_step import Models, encode_tiles, load_models

logger = logging.getLogger(__name__)

GDAL_CACHE_MB = 256
"""GDAL's block cache during a run (its default is 5% of RAM, which a scene-sized class map would fill)."""


def _bounded_gdal_cache(function):
    """Run ``function`` with GDAL_CACHEMAX = GDAL_CACHE_MB, unless the user set GDAL_CACHEMAX."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if "GDAL_CACHEMAX" in os.environ:
            return function(*args, **kwargs)
        import rasterio

        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            return function(*args, **kwargs)

    return wrapper


class Segmenter:
    """Open-vocabulary segmentation of scenes and arrays with ConInfer.

    >>> seg = Segmenter("building,roof;road;tree;water")               # doctest: +SKIP
    >>> seg.segment_file("scene.tif", "classes.tif", vector="classes.gpkg")  # doctest: +SKIP
    >>> labels, probs = seg.segment_array(rgb)                           # doctest: +SKIP
    """

    def __init__(self, classes: ClassList | str | Sequence[str], *, vlm: str = "clip-b16",
                 vfm: str = "dinov3-l16-sat", device: str = "auto", precision: str = "auto",
                 settings: InferenceSettings = InferenceSettings(), clip_variant: str | None = None,
                 attn_lambda: float | None = None, cache_dir: str | Path | None = None) -> None:
        classes = _as_class_list(classes)
        _check_classes(classes, settings)
        if clip_variant or attn_lambda is not None:
            settings = dataclasses.replace(settings, clip=DenseCLIPSettings.for_variant(
                clip_variant or settings.clip.variant, attn_lambda=attn_lambda))
        needs_vfm = settings.needs_vfm
        self.models = load_models(classes, vlm=vlm, vfm=vfm if needs_vfm else None, device=device,
                                  precision=precision, clip_settings=settings.clip, cache_dir=cache_dir)
        self.models.grid_size(settings.model_res)  # a model_res the patch size does not divide fails now
        self.settings = settings
        self.model_names = {"vlm": vlm, "vfm": vfm if needs_vfm else None, "clip_settings": asdict(settings.clip)}

    @classmethod
    def from_models(cls, models: Models, settings: InferenceSettings = InferenceSettings(),
                    model_names: dict | None = None) -> Segmenter:
        """A Segmenter around already-loaded models (tests, notebooks).

        ``model_names`` identifies the models in the report and in the key of the resumable work directory
        (default: the models' names, so give it when two different models share a name).
        """
        _check_classes(models.classes, settings)
        models.grid_size(settings.model_res)
        segmenter = cls.__new__(cls)
        segmenter.models, segmenter.settings = models, settings
        segmenter.model_names = model_names or {"vlm": getattr(models.clip, "name", type(models.clip).__name__),
                                                "vfm": getattr(models.vfm, "name", None)}
        return segmenter

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.models.classes.names

    def segment_array(self, rgb: np.ndarray, options: SceneOptions = SceneOptions(), *,
                      workdir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment an (H, W, 3) uint8 array as a scene; returns labels (H, W) uint8 and probs (C, H, W)."""
        import tempfile

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"rgb must be an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
        with tempfile.TemporaryDirectory(dir=workdir) as folder:
            scene = _array_scene(rgb, Path(folder) / "array.tif")
            store = self._prepare(scene, options, Path(folder) / "work", resume=False, progress=False)
            labels = np.full(rgb.shape[:2], NODATA_LABEL, np.uint8)
            probs = np.zeros((len(self.class_names), *rgb.shape[:2]), np.float32)
            for block in self._stitch(scene, store, options, progress=False):
                rows, cols = block.window.toslices()
                labels[rows, cols] = block.labels
                probs[:, rows, cols] = block.probs
        return labels, probs

    @_bounded_gdal_cache
    def segment_file(self, path: str | Path | read.Scene, out: str | Path, options: SceneOptions = SceneOptions(),
                     *, bands: Sequence[int] | None = None, probabilities: str | Path | None = None,
                     vector: str | Path | None = None, preview: str | Path | None = None,
                     report: str | Path | None = None, workdir: str | Path | None = None, resume: bool = True,
                     keep_workdir: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
        """Segment a raster file (or a scene already opened with :func:`~coninfer.raster.read.open_scene`, then
        without ``bands``) into a class-map COG (+ optional outputs); returns the report dict.

        ``report`` defaults to ``OUT`` with the suffix ``.json``. Every output is checked before any work; all
        are written to temporary files and moved into place together at the end, so a failed or killed run
        leaves none of them. The work directory (default ``$CONINFER_CACHE/work``, else
        ``~/.cache/coninfer/work``) keeps the store of an unfinished run so that a second call with the same
        input and settings resumes it; a run holds a lock on its store, so a concurrent identical run fails.
        """
        started = time.perf_counter()
        if isinstance(path, read.Scene) and bands is not None:
            raise InputError("bands are chosen when the scene is opened", hint="pass open_scene(path, bands=...)")
        source = path.path if isinstance(path, read.Scene) else Path(path)
        outputs = check_outputs(source, out, probabilities=probabilities, vector=vector, preview=preview,
                                report=report, overwrite=overwrite)
        scene = path if isinstance(path, read.Scene) else read.open_scene(path, bands=bands)
        if read.scene_is_empty(scene):
            raise InputError(f"{source} is entirely nodata", hint="check the nodata value / mask of the input")
        folder = self._workdir(scene, options, workdir)
        timings = {}
        with locked_folder(folder):
            store = self._prepare(scene, options, folder, resume=resume, progress=progress, timings=timings)
            try:
                summary = self._write_outputs(scene, store, options, outputs, progress=progress, timings=timings,
                                              started=started)
            finally:
                store.close()
            if not keep_workdir:
                shutil.rmtree(folder, ignore_errors=True)
        return summary

    def _write_outputs(self, scene, store: TileStore, options: SceneOptions, outputs: dict[str, Path], *,
                       progress: bool, timings: dict, started: float) -> dict:
        """Pass 3 and the extras, each into a temporary file; all move into place only when every one is done."""
        with ExitStack() as staging:
            staged = {kind: staging.enter_context(write.atomic_path(path)) for kind, path in outputs.items()}
            tick = time.perf_counter()
            counts, areas = self._write_rasters(scene, store, options, staged, progress=progress)
            timings["stitch_write_s"] = time.perf_counter() - tick
            if "vector" in outputs:
                tick = time.perf_counter()
                write.write_vectors(staged["vector"], staged["class_map"], list(self.class_names),
                                    layer=outputs["vector"].stem)
                timings["vector_s"] = time.perf_counter() - tick
            if "preview" in outputs:
                tick = time.perf_counter()
                self._write_preview(scene, staged["class_map"], staged["preview"])
                timings["preview_s"] = time.perf_counter() - tick
            timings["total_s"] = time.perf_counter() - started
            summary = self._report(scene, options, counts, areas, outputs, timings, store)
            write.write_report(staged["report"], summary)
        return summary

    # -- passes -----------------------------------------------------------------------------------------------

    def _workdir(self, scene, options: SceneOptions, workdir: str | Path | None) -> Path:
        """``workdir`` (default: the coninfer cache's ``work``) / a hash of everything the store depends on."""
        root = Path(workdir) if workdir else default_cache_dir() / "work"
        stat = scene.path.stat()
        key = json.dumps({
            # ctime and inode change whenever the file is rewritten, even by tools that restore its mtime
            "input": str(scene.path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
            "ctime": stat.st_ctime_ns, "inode": stat.st_ino,
            "bands": scene.bands, "options": asdict(options), "settings": asdict(self.settings),
            "models": self.model_names, "queries": list(self.models.classes.queries), "version": STORE_VERSION,
        }, sort_keys=True, default=str)
        return root / hashlib.sha256(key.encode()).hexdigest()[:20]

    def _prepare(self, scene, options: SceneOptions, folder: Path, *, resume: bool, progress: bool,
                 timings: dict | None = None) -> TileStore:
        """Passes 1 and 2: encode every tile into the store, then solve the context; resumes a killed run."""
        timings = {} if timings is None else timings
        grid = TileGrid(scene.width, scene.height, options.tile_size, options.overlap)
        patches = self.models.grid_size(self.settings.model_res) ** 2
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_folder(folder)
        except OSError as error:
            raise OutputError(f"cannot create the work folder {folder}: {error.strerror or error}",
                              hint="pass --workdir with a writable folder") from error
        store = TileStore(folder, len(grid), patches, len(self.models.classes.queries))
        tick = time.perf_counter()
        self._encode_pass(scene, grid, store, options, progress)
        timings["encode_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if not store.state["solved"]:
            self._solve_pass(store, options)
            store.commit(store.state["next_tile"], solved=True)
        timings["solve_s"] = time.perf_counter() - tick
        return store

    def _encode_pass(self, scene, grid: TileGrid, store: TileStore, options: SceneOptions, progress: bool) -> None:
        from tqdm import tqdm

        start = store.state["next_tile"]
        bar = tqdm(total=len(grid), initial=start, unit="tile", disable=not progress, desc="encode",
                   dynamic_ncols=True)
        batch_size = options.batch_size
        with scene.open() as src:
            for first in range(start, len(grid), options.batch_size):
                indices = list(range(first, min(first + options.batch_size, len(grid))))
                tiles, kept, empty, masks = [], [], [], []
                for index in indices:
                    rgb, valid = _read_tile(scene, grid.window(index), src)
                    if not valid.any():
                        empty.append(index)
                        continue
                    tiles.append(torch.from_numpy(rgb))
                    kept.append(index)
                    masks.append(valid)
                if tiles:
                    logits, features, batch_size = self._encode_adaptive(tiles, batch_size)
                    patch_valid = np.stack([_patch_validity(mask, self.models.grid_size(self.settings.model_res))
                                            for mask in masks])
                    store.put(kept, logits, features, patch_valid)
                store.commit(indices[-1] + 1, empty)
                bar.update(len(indices))
        bar.close()

    def _encode_adaptive(self, tiles: list[torch.Tensor], batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Encode in sub-batches of ``batch_size``, halving it on CUDA out-of-memory (kept for later groups)."""
        while True:
            try:
                parts = [encode_tiles(self.models, tiles[i : i + batch_size], self.settings)
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
                logger.warning("CUDA out of memory: continuing with batch size %d", batch_size)

    def _solve_pass(self, store: TileStore, options: SceneOptions) -> None:
        empty = set(store.state["empty"])
        tiles = [i for i in range(store.shape[0]) if i not in empty]
        chunk_tiles = options.solver_chunk_tiles
        if options.context == "none" or self.settings.method == "baseline":
            self._keep_prior(store, tiles, chunk_tiles)
            return
        size = len(tiles) if options.context == "scene" else options.context_size
        for context in _groups(tiles, size):
            valid_patches = sum(int(np.asarray(store.valid[group]).sum()) for group in _groups(context, chunk_tiles))
            if valid_patches < self.settings.solver.init_topk:
                # the mixture needs init_topk patches to start from; a sliver of data keeps its prior instead
                logger.warning("%d tile(s) (%s) hold %d valid patches, fewer than init_topk=%d: they keep the "
                               "CLIP prior", len(context), _tile_range(context), valid_patches,
                               self.settings.solver.init_topk)
                self._keep_prior(store, context, chunk_tiles)
            else:
                self._solve_context(store, context, chunk_tiles)

    def _keep_prior(self, store: TileStore, tiles: list[int], chunk_tiles: int) -> None:
        """z = softmax(prior_scale * logits) for ``tiles`` (the ``none`` context and the baseline method)."""
        for group in _groups(tiles, chunk_tiles):
            logits = torch.from_numpy(np.asarray(store.logits[group]))
            store.z[group] = torch.softmax(self.settings.solver.prior_scale * logits, -1).numpy()

    def _solve_context(self, store: TileStore, tiles: list[int], chunk_tiles: int) -> None:
        """One mixture over ``tiles`` (at least init_topk valid patches), streamed from the store in chunks; z
        written back to the store."""
        solver_settings = self.settings.solver
        device = self.models.device

        def fit_chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for group in _groups(tiles, chunk_tiles):
                valid = np.asarray(store.valid[group]).astype(bool).reshape(-1)  # (n*P,)
                logits = np.asarray(store.logits[group]).reshape(-1, store.num_queries)[valid]
                features = np.asarray(store.features[group]).reshape(valid.shape[0], -1)[valid]
                if len(logits):
                    yield torch.from_numpy(logits).to(device), torch.from_numpy(features).to(device)

        fit = fit_context(fit_chunks, solver_settings)
        for group in _groups(tiles, chunk_tiles):
            logits = torch.from_numpy(np.asarray(store.logits[group]).reshape(-1, store.num_queries)).to(device)
            features = torch.from_numpy(np.asarray(store.features[group]).reshape(logits.shape[0], -1)).to(device)
            z = assign(logits, features, fit.state, solver_settings)
            store.z[group] = z.cpu().numpy().reshape(len(group), -1, store.num_queries)

    def _stitch(self, scene, store: TileStore, options: SceneOptions, *, progress: bool):
        """Pass 3: yield final blocks (window, labels, probs, valid) band by band, in row order."""
        from tqdm import tqdm

        grid = TileGrid(scene.width, scene.height, options.tile_size, options.overlap)
        side = self.models.grid_size(self.settings.model_res)
        empty = set(store.state["empty"])
        num_classes = len(self.class_names)
        stitcher = BandStitcher(grid, num_classes)
        bar = tqdm(total=len(grid), unit="tile", disable=not progress, desc="stitch", dynamic_ncols=True)
        thresholds = {"prob_thd": self.settings.post.prob_thd, "bg_index": self.settings.post.bg_index}
        with scene.open() as src:
            for index in range(len(grid)):
                probs = valid = None
                if index not in empty:
                    z = torch.from_numpy(store.z[index]).to(self.models.device)  # (P, K)
                    probs = class_probabilities(patches_to_grid(z, side, side), (grid.tile_size, grid.tile_size),
                                                self.models.classes.query_to_class, self.settings.post.logit_scale)
                    probs = probs[0].cpu().numpy()
                    _, valid = _read_tile(scene, grid.window(index), src)
                yield from stitcher.add(index, probs, valid, **thresholds)
                bar.update(1)
        bar.close()

    def _write_rasters(self, scene, store: TileStore, options: SceneOptions, outputs: dict[str, Path], *,
                       progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Pass 3 into the class map (and probabilities) COGs; returns the pixel count (C,) int64 and the area
        (C,) float64 in the scene's area unit of each class."""
        class_names = list(self.class_names)
        counts = np.zeros(len(class_names), np.int64)
        areas = np.zeros(len(class_names), np.float64)
        with ExitStack() as writers:  # each writer commits its file only if every block was written
            class_writer = writers.enter_context(write.ClassMapWriter(outputs["class_map"], scene.georef, class_names))
            prob_writer = None
            if "probabilities" in outputs:
                prob_writer = writers.enter_context(
                    write.ProbabilityWriter(outputs["probabilities"], scene.georef, class_names))
            for block in self._stitch(scene, store, options, progress=progress):
                class_writer.write(block.window, block.labels)
                counts += write.count_classes(block.labels, len(class_names))
                areas += write.class_areas(block.labels, block.window, scene.georef, len(class_names))
                if prob_writer is not None:
                    prob_writer.write(block.window, block.probs, block.valid)
        return counts, areas

    def _write_preview(self, scene, class_map: Path, path: Path) -> None:
        """PNG of the scene (decimated to 1024 px) under the written class map, with a legend."""
        import rasterio
        from rasterio.enums import Resampling

        rgb, _ = read.read_overview(scene, max_size=1024)
        with rasterio.open(class_map) as src:
            labels = src.read(1, out_shape=rgb.shape[1:], resampling=Resampling.nearest)
        write.write_preview(path, rgb, labels, list(self.class_names))

    def _report(self, scene, options, counts, areas, outputs, timings, store) -> dict:
        empty = len(store.state["empty"])
        tiles = store.shape[0]
        encode_s = timings.get("encode_s", 0.0)
        return {
            "input": str(scene.path),
            "outputs": {name: str(path) for name, path in outputs.items()},
            "crs": scene.georef.crs.to_string() if scene.georef.crs else None,
            "size": {"width": scene.width, "height": scene.height},
            "classes": [{**row} for row in write.class_statistics(counts, list(self.class_names), scene.georef, areas)],
            "queries": list(self.models.classes.queries),
            "settings": {"scene": asdict(options), "inference": asdict(self.settings), "models": self.model_names,
                         "bands": list(scene.bands), "device": str(self.models.device),
                         "dtype": str(self.models.dtype).replace("torch.", "")},
            "tiles": {"total": tiles, "empty": empty, "encoded": tiles - empty, "resumed_from": store.resumed_from,
                      "tiles_per_s": round((tiles - empty) / encode_s, 3) if encode_s > 0 else None},
            "timings_s": {name: round(value, 3) for name, value in timings.items()},
        }


_SUFFIXES = {"class_map": (".tif", ".tiff"), "probabilities": (".tif", ".tiff"),
             "vector": (".gpkg", ".geojson", ".json")}
"""File name suffixes each output kind accepts (GeoTIFF rasters, GDAL vector drivers); others accept any."""


def check_outputs(source: str | Path, out: str | Path, *, probabilities: str | Path | None = None,
                  vector: str | Path | None = None, preview: str | Path | None = None,
                  report: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """The outputs of a run by kind (``class_map``, ``report`` = ``out`` with ``.json`` unless given, and those of
    the optional ones that are given), checked before any work is done.

    Raises:
        InputError: an unknown suffix, or two outputs sharing one path.
        OutputError: an output that is the input, exists (without ``overwrite``), or lies in a missing or
            unwritable folder.
    """
    report = report or Path(out).with_suffix(".json")
    given = {"class_map": out, "probabilities": probabilities, "vector": vector, "preview": preview, "report": report}
    outputs = {kind: Path(value) for kind, value in given.items() if value is not None}
    for kind, suffixes in _SUFFIXES.items():
        if kind in outputs and outputs[kind].suffix.lower() not in suffixes:
            raise InputError(f"{kind.replace('_', ' ')} {outputs[kind]}: unknown extension {outputs[kind].suffix!r}",
                             hint=f"use a file name ending in {' or '.join(suffixes)}")
    if len({path.resolve() for path in outputs.values()}) != len(outputs):
        raise InputError("two outputs share one path", hint="give each output its own file name")
    for target in outputs.values():
        write.check_output_path(target, overwrite=overwrite, inputs=[source])
    return outputs


def _read_tile(scene: read.Scene, window, src) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~coninfer.raster.read.read_window`, with a damaged part of the file as a one-line input error."""
    try:
        return read.read_window(scene, window, src=src)
    except RasterioError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputFileError(f"cannot read {scene.path} at pixel window {window.flatten()}: {reason}",
                             hint="the file may be truncated or corrupt; check it with gdalinfo -checksum") from error


def _array_scene(rgb: np.ndarray, path: Path) -> read.Scene:
    """Write (H, W, 3) uint8 pixels as a GeoTIFF without georeferencing and open it as a scene."""
    import rasterio
    from affine import Affine

    georef = read.Georef(rgb.shape[1], rgb.shape[0], None, Affine.identity())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel coordinates are all an array has
        with rasterio.open(path, "w", **georef.profile(count=3, dtype="uint8")) as dst:
            dst.write(np.moveaxis(rgb, -1, 0))
    return read.open_scene(path)


def _check_classes(classes: ClassList, settings: InferenceSettings) -> None:
    """Checks that need both the classes and the settings, done before any model is loaded."""
    count = len(classes.names)
    if count > NODATA_LABEL:
        raise InputError(f"{count} classes, at most {NODATA_LABEL} fit a uint8 class map ({NODATA_LABEL} is nodata)",
                         hint="merge classes as synonyms (a,b) or split the run")
    if settings.post.bg_index >= count:
        raise InputError(f"bg_index {settings.post.bg_index} is not a class index (0..{count - 1})",
                         hint="give the background class's position in the class list")


def _tile_range(tiles: Sequence[int]) -> str:
    return str(tiles[0]) if len(tiles) == 1 else f"{tiles[0]}..{tiles[-1]}"


def _groups(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _patch_validity(valid: np.ndarray, side: int) -> np.ndarray:
    """(side*side,) uint8: 1 where at least half of the patch's source pixels are valid."""
    height, width = valid.shape
    rows = np.minimum((np.arange(height) * side) // height, side - 1)
    cols = np.minimum((np.arange(width) * side) // width, side - 1)
    flat = (rows[:, None] * side + cols[None, :]).ravel()
    total = np.bincount(flat, minlength=side * side)
    good = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=side * side)
    return (good * 2 >= total).astype(np.uint8)


def _as_class_list(classes: ClassList | str | Sequence[str]) -> ClassList:
    if isinstance(classes, ClassList):
        return classes
    if isinstance(classes, str):
        return ClassList.parse(classes)
    return ClassList.from_names(list(classes))
