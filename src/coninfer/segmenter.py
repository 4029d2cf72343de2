"""The user API: :class:`Segmenter` composes the scene passes of :mod:`coninfer.pipeline` for files and arrays.

>>> seg = Segmenter.from_presets("building,roof;road;tree;water")           # doctest: +SKIP
>>> seg.segment_file("scene.tif", "classes.tif", vector="classes.gpkg")     # doctest: +SKIP
>>> labels, probs = seg.segment_array(rgb)                                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from coninfer import _fs, distributed
from coninfer.errors import InputError, OutputError
from coninfer.memory import check_memory, run_shape
from coninfer.outputs import check_outputs, needs_probabilities, write_outputs
from coninfer.pipeline import (
    ArrayScene,
    MemoryEmbeddings,
    MemoryStore,
    array_reader,
    encode_scene,
    file_reader,
    prior_scene,
    read_spooled,
    scene_grid,
    solve_store,
    spool_blocks,
    stitch_scene,
)
from coninfer.prompts import ClassList
from coninfer.raster import read, report_html, style, write
from coninfer.raster.source import gdal_env, is_virtual
from coninfer.raster.tiles import NODATA_LABEL
from coninfer.settings import DenseCLIPSettings, InferenceSettings, SceneOptions
from coninfer.store import STORE_VERSION, EmbeddingStore, TileStore, clear_folder, locked_folder
from coninfer.tile_step import Models, load_models
from coninfer.work_cache import write_about

logger = logging.getLogger(__name__)

class Segmenter:
    """Open-vocabulary segmentation of scenes and arrays with ConInfer, around loaded models.

    ``Segmenter(models, settings)`` takes :class:`~coninfer.tile_step.Models` (tests, notebooks, a model of your
    own); :meth:`from_presets` loads presets, local checkpoints or hub ids.
    """

    def __init__(self, models: Models, settings: InferenceSettings = InferenceSettings()) -> None:
        _check_classes(models.classes, settings)
        models.grid_size(settings.model_res)  # a model_res the patch size does not divide fails now
        if settings.prior == "segearth-ov" and models.upsampler is None:
            raise InputError("the segearth-ov prior needs a SimFeatUp upsampler but none is loaded",
                             hint="pass --upsampler PATH_OR_HUB_FILE (the released SimFeatUp .ckpt)")
        if settings.needs_vfm and models.vfm is None:
            raise InputError(f"method {settings.method!r} needs a VFM but none is loaded",
                             hint="load one (--vfm), or use --method baseline")
        self.models = models
        self.settings = settings

    @classmethod
    def from_presets(cls, classes: ClassList | str | Sequence[str], *, vlm: str = "clip-b16",
                     vfm: str = "dinov3-l16-sat", device: str = "auto", precision: str = "auto",
                     settings: InferenceSettings = InferenceSettings(), clip_variant: str | None = None,
                     attn_lambda: float | None = None, cache_dir: str | Path | None = None,
                     upsampler: str | Path | None = None, compile_models: bool = False) -> Segmenter:
        """Load ``vlm`` and (when the method needs one) ``vfm`` by preset name, path or hub id; embed the classes.

        ``clip_variant`` / ``attn_lambda`` override ``settings.clip`` (the paper's Table-2 variants).
        ``upsampler``: SimFeatUp weights (path or hub file) for ``settings.prior == "segearth-ov"``.
        ``compile_models``: torch.compile both encoders (:func:`coninfer.tile_step.compile_encoder`).
        """
        classes = _as_class_list(classes)
        if clip_variant or attn_lambda is not None:
            settings = dataclasses.replace(settings, clip=DenseCLIPSettings.for_variant(
                clip_variant or settings.clip.variant, attn_lambda=attn_lambda))
        _check_classes(classes, settings)
        models = load_models(classes, vlm=vlm, vfm=vfm if settings.needs_vfm else None, device=device,
                             precision=precision, clip_settings=settings.clip, cache_dir=cache_dir,
                             upsampler=str(upsampler) if upsampler else None, compile_models=compile_models)
        return cls(models, settings)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.models.classes.names

    def colors(self, overrides: str | Mapping[str, tuple[int, int, int]] | None = None) -> list:
        """One RGB colour per class: chosen from the class names, ``overrides`` (text or mapping) first."""
        if isinstance(overrides, str):
            overrides = style.parse_colors(overrides, self.models.classes)
        return style.class_colors(self.models.classes, overrides)

    def model_identity(self) -> dict:
        """The models as the report and the resume key name them: name and a fingerprint of the weights."""
        return {role: None if model is None else {"name": getattr(model, "name", type(model).__name__),
                                                  "fingerprint": getattr(model, "fingerprint", None)}
                for role, model in (("vlm", self.models.clip), ("vfm", self.models.vfm),
                                    ("upsampler", self.models.upsampler))}

    def segment_array(self, rgb, options: SceneOptions = SceneOptions(), *, valid=None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Segment an (H, W, 3) uint8 array (numpy or torch) as a scene, in memory; ``valid`` (H, W) bool marks
        pixels with data (default: all). Returns labels (H, W) uint8 (255 where invalid) and probs (C, H, W)."""
        scene = ArrayScene(_as_numpy(rgb, "rgb"), None if valid is None else _as_numpy(valid, "valid").astype(bool))
        grid = scene_grid(scene.width, scene.height, options)
        check_memory(run_shape(self.models, self.settings, grid, options, in_memory=True), device=self.models.device)
        patches = self.models.grid_size(self.settings.model_res) ** 2
        embeddings = MemoryEmbeddings(len(grid), patches)
        store = MemoryStore(len(grid), patches, len(self.models.classes.queries), embeddings)
        labels = np.full((scene.height, scene.width), NODATA_LABEL, np.uint8)
        probs = np.zeros((len(self.class_names), scene.height, scene.width), np.float32)
        with array_reader(scene) as read_tile:
            encode_scene(self.models, self.settings, read_tile, grid, embeddings, batch_size=options.batch_size)
            prior_scene(self.models, self.settings, read_tile, grid, store, batch_size=options.batch_size)
            solve_store(store, self.settings, options, device=self.models.device)
            for block in stitch_scene(self.models, self.settings, read_tile, grid, store):
                rows, cols = block.window.toslices()
                labels[rows, cols] = block.labels
                probs[:, rows, cols] = block.probs
        return labels, probs

    def segment_file(self, path: str | Path | read.Scene, out: str | Path, options: SceneOptions = SceneOptions(),
                     *, bands: Sequence[int] | None = None, nodata: float | None = None,
                     workdir: str | Path | None = None, resume: bool = True, keep_workdir: bool = False,
                     keep_embeddings: bool = False, overwrite: bool = False, progress: bool = True,
                     dist: distributed.Dist | None = None,
                     colors: str | Mapping[str, tuple[int, int, int]] | None = None,
                     **outputs: str | Path | None) -> dict:
        """Segment a raster file (or a scene opened with :func:`~coninfer.raster.read.open_scene`, then without
        ``bands``) into a class-map COG plus the optional ``outputs`` named by :data:`coninfer.outputs.OUTPUTS`
        (``probabilities=``, ``confidence=``, ``vector=``, ``preview=``, ``report=``, ``html=``); returns the
        report dict. ``colors`` overrides the palette chosen from the class names (``"building=#d7191c"`` or a
        mapping class name -> RGB); the same colours go to the class map, preview, vectors and reports.

        ``keep_embeddings`` keeps what does not depend on the classes (CLIP tokens, VFM features, validity:
        about 16 MB per megapixel at the default tile and model sizes) in the work directory, so that a later
        call on the same scene and models with other classes, synonyms, solver settings or threshold runs no
        encoder (a re-query); ``keep_workdir`` keeps the class-dependent store as well.

        ``report`` defaults to ``out`` with the suffix ``.json``. Every output is checked before any work; all
        are written to temporary files and moved into place together at the end, so a failed or killed run
        leaves none of them. The work directory (default ``$CONINFER_CACHE/work``) keeps the store of an
        unfinished run so that a second call with the same input, settings and weights resumes it; a run holds
        a lock on its store, so a concurrent identical run fails.
        """
        started = time.perf_counter()
        if isinstance(path, read.Scene) and (bands is not None or nodata is not None):
            raise InputError("bands and nodata are chosen when the scene is opened",
                             hint="pass open_scene(path, bands=..., nodata=...)")
        source = path.path if isinstance(path, read.Scene) else path
        targets = check_outputs(source, {"class_map": out, **outputs}, overwrite=overwrite)
        palette = self.colors(colors)
        dist = dist or distributed.current()
        # rank 0 holds the outputs from this check to the final move (a concurrent run on them stops at once)
        # and the embeddings folder for the whole run (its query folders live inside it); the other ranks of
        # the run work under its locks
        with (_fs.hold_outputs(targets.values()) if dist.is_main else nullcontext()), gdal_env(source):
            targets = check_outputs(source, targets, overwrite=overwrite)  # again, now that no one else writes
            # before the work folder exists: a run that cannot fit leaves nothing behind
            scene = self._open_checked(path, options, bands, nodata)
            folder = self._workdir(scene, options, workdir)
            queries = self._query_folder(folder, options)
            with locked_folder(folder) if dist.is_main else nullcontext():
                if dist.grouped:
                    distributed.check_shared_folder(dist, folder.parent)
                summary = self._run(scene, options, folder, queries, targets, resume=resume,
                                    progress=progress and dist.is_main, started=started, overwrite=overwrite,
                                    colors=palette, dist=dist)
                distributed.barrier(dist)
                if not keep_workdir and dist.is_main:
                    shutil.rmtree(folder if not keep_embeddings else queries, ignore_errors=True)
        return distributed.broadcast_object(dist, summary)

    def _run(self, scene, options: SceneOptions, folder: Path, queries: Path, targets: dict[str, Path], *,
             resume: bool, progress: bool, started: float, overwrite: bool, colors: list,
             dist: distributed.Dist) -> dict | None:
        """The passes; with several ranks each encodes and priors its share of the missing tiles (the lists
        come from rank 0, so every rank splits the same list), all solve, each stitches its band of tile rows
        into a spool in the query folder, and rank 0 writes the outputs from the spools in row order."""
        grid = scene_grid(scene.width, scene.height, options)
        timings: dict[str, float] = {}
        store = self._open_store(folder, queries, len(grid), resume=resume, source=scene.path, dist=dist)

        try:
            with file_reader(scene) as read_tile:
                timings.update(self._encode_and_prior(read_tile, grid, store, options, progress=progress, dist=dist))
                tick = time.perf_counter()
                solve_store(store, self.settings, options, device=self.models.device, dist=dist)
                timings["solve_s"] = time.perf_counter() - tick
                spool = queries / "stitch"
                if dist.grouped:
                    self._stitch_band(read_tile, grid, store, spool, progress=progress, dist=dist)
                    if not dist.is_main:
                        return None
                    paths = [spool / f"rank{rank:05d}.bin" for rank in range(dist.world_size)]
                    blocks = read_spooled(paths, len(self.class_names))
                else:
                    blocks = stitch_scene(self.models, self.settings, read_tile, grid, store, progress=progress,
                                          probabilities=needs_probabilities(targets))

                def summarize(counts: np.ndarray, areas: np.ndarray) -> dict:
                    timings["total_s"] = time.perf_counter() - started
                    return self._report(scene, options, counts, areas, targets, timings, store, colors)

                return write_outputs(targets, scene, list(self.class_names), colors, blocks, summarize, timings,
                                     overwrite=overwrite)
        finally:
            store.close()
            if dist.is_main:
                shutil.rmtree(queries / "stitch", ignore_errors=True)

    def _encode_and_prior(self, read_tile, grid, store: TileStore, options: SceneOptions, *, progress: bool,
                          dist: distributed.Dist) -> dict[str, float]:
        """Passes 1 and 2 over the tiles ``store`` lacks; with several ranks each takes its share of rank 0's
        list (so every rank splits the same list). Returns their seconds, ``encode_s`` and ``prior_s``."""

        def share(missing: list[int]) -> list[int] | None:
            return distributed.split(dist, distributed.broadcast_object(dist, missing)) if dist.grouped else None

        tick = time.perf_counter()
        encode_scene(self.models, self.settings, read_tile, grid, store.embeddings, batch_size=options.batch_size,
                     tiles=share(store.embeddings.missing_tiles()), progress=progress)
        distributed.barrier(dist)
        encoded = time.perf_counter()
        prior_scene(self.models, self.settings, read_tile, grid, store, batch_size=options.batch_size,
                    tiles=share(store.missing_tiles()), progress=progress)
        distributed.barrier(dist)
        return {"encode_s": encoded - tick, "prior_s": time.perf_counter() - encoded}

    def _stitch_band(self, read_tile, grid, store: TileStore, spool: Path, *, progress: bool,
                     dist: distributed.Dist) -> None:
        """This rank's band of tile rows (:func:`distributed.band_of`) stitched into ``spool/rankNNNNN.bin``:
        the stitching work and its memory are shared out, the outputs keep one writer. A spool left by a killed
        run is replaced, not resumed (stitching redoes no model work)."""
        if dist.is_main:
            shutil.rmtree(spool, ignore_errors=True)
            spool.mkdir(parents=True)
        distributed.barrier(dist)
        band = distributed.band_of(dist, grid.n_rows)
        try:
            spool_blocks(stitch_scene(self.models, self.settings, read_tile, grid, store, rows=band,
                                      progress=progress), spool / f"rank{dist.rank:05d}.bin")
        except OSError as error:
            raise _fs.write_error(spool, error) from error
        distributed.barrier(dist)

    def _open_store(self, folder: Path, queries: Path, num_tiles: int, *, resume: bool, source,
                    dist: distributed.Dist) -> TileStore:
        """The query store in ``queries`` over the embedding store in ``folder``, both checked: damaged tile
        records (one warning) are discarded, so they are encoded again; nothing damaged is read. Rank 0 clears
        and repairs before the other ranks open their writers."""
        patches = self.models.grid_size(self.settings.model_res) ** 2
        ranks = {"rank": dist.rank, "num_ranks": dist.world_size}
        if not dist.is_main:
            distributed.barrier(dist)
            embeddings = EmbeddingStore(folder, num_tiles, patches, **ranks)
            store = TileStore(queries, num_tiles, patches, len(self.models.classes.queries), embeddings=embeddings,
                              **ranks)
            store.resumed_from = distributed.broadcast_object(dist, None)
            return store
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_folder(folder)
            queries.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the work folder {folder}: {error.strerror or error}",
                              hint="pass --workdir with a writable folder") from error
        embeddings = EmbeddingStore(folder, num_tiles, patches, **ranks)
        write_about(folder, input_path=_input_identity(source)["input"], models=self.model_identity(), tiles=num_tiles)
        store = TileStore(queries, num_tiles, patches, len(self.models.classes.queries), embeddings=embeddings,
                          **ranks)
        store.discard(embeddings.repair())
        store.repair()
        # tiles whose embeddings an earlier run stored (an interrupted run, or a re-query with other classes)
        store.resumed_from = num_tiles - len(embeddings.missing_tiles())
        distributed.barrier(dist)  # the other ranks open their writers now
        distributed.broadcast_object(dist, store.resumed_from)
        return store

    def _workdir(self, scene, options: SceneOptions, workdir: str | Path | None) -> Path:
        """The embeddings folder: ``workdir`` (default: the coninfer cache's ``work``) / a hash of everything
        the class-independent embeddings depend on (input, bands, nodata, tiling, models, CLIP settings,
        precision and device), not of the classes or solver settings."""
        root = Path(workdir) if workdir else _fs.cache_dir() / "work"
        models = self.model_identity()
        key = json.dumps({
            "input": _input_identity(scene.path), "bands": scene.bands, "nodata": _json_number(scene.nodata),
            "tiling": [options.tile_size, options.overlap, options.batch_size], "model_res": self.settings.model_res,
            "clip": asdict(self.settings.clip), "vlm": models["vlm"],
            "vfm": models["vfm"] if self.settings.needs_vfm else None,
            "dtype": str(self.models.dtype), "device": self.models.device.type, "version": STORE_VERSION,
        }, sort_keys=True, default=str)
        return root / hashlib.sha256(key.encode()).hexdigest()[:20]

    def _query_folder(self, folder: Path, options: SceneOptions) -> Path:
        """``folder/queries/<hash>``: the class-dependent store, keyed by the queries (and their embeddings),
        the prior and the solver; post-processing (thresholds, colours) is redone by every run."""
        queries = self.models.query_embeddings.detach().float().cpu().contiguous().numpy()
        key = json.dumps({
            "queries": list(self.models.classes.queries),
            "query_embeddings": hashlib.sha256(queries.tobytes()).hexdigest(),
            "method": self.settings.method, "prior": self.settings.prior, "features": self.settings.features,
            "solver": asdict(self.settings.solver), "upsampler": self.model_identity()["upsampler"],
            "context": [options.context, options.context_size, options.solver_chunk_tiles],
        }, sort_keys=True, default=str)
        return folder / "queries" / hashlib.sha256(key.encode()).hexdigest()[:20]

    def _report(self, scene, options, counts, areas, outputs, timings, store, colors) -> dict:
        empty = len(store.empty_tiles())
        tiles = store.shape[0]  # encoded_now: a fully resumed run encoded none and claims no speed
        encoded_now = tiles - empty - store.resumed_from
        encode_s = timings.get("encode_s", 0.0)
        return {
            "input": str(scene.path),
            "outputs": {name: str(path) for name, path in outputs.items()},
            "crs": scene.georef.crs.to_string() if scene.georef.crs else None,
            "input_reading": {"georeference": scene.georef.kind, "expanded_palette": scene.expanded_palette,
                              "nodata": _json_number(scene.nodata), "nodata_explicit": scene.nodata_explicit,
                              "untagged_fill_values": [_json_number(v) for v in scene.fill_values], "statistics_from": scene.stats_source,
                              "pages": scene.pages},
            "size": {"width": scene.width, "height": scene.height},
            "georeference": report_html.georeference(scene.georef),
            "classes": [{**row, "color": style.hex_color(color)} for row, color in
                        zip(write.class_statistics(counts, list(self.class_names), scene.georef, areas), colors,
                            strict=True)],
            "queries": list(self.models.classes.queries),
            "settings": {"scene": asdict(options), "inference": asdict(self.settings), "models": self.model_identity(),
                         "bands": list(scene.bands), "device": str(self.models.device),
                         "dtype": str(self.models.dtype).replace("torch.", "")},
            "tiles": {"total": tiles, "empty": empty, "encoded": tiles - empty, "resumed_from": store.resumed_from,
                      # tiles encoded by this run only: a fully resumed run encodes none and claims no speed
                      "tiles_per_s": round(encoded_now / encode_s, 3) if encode_s > 0 and encoded_now > 0 else None},
            "timings_s": {name: round(value, 3) for name, value in timings.items()},
        }

    # -- many scenes ----------------------------------------------------------------------------------------------

    def segment_files(self, paths: Sequence[str | Path], output_dir: str | Path,
                      options: SceneOptions = SceneOptions(), *, bands: Sequence[int] | None = None,
                      nodata: float | None = None, workdir: str | Path | None = None, resume: bool = True,
                      keep_workdir: bool = False, keep_embeddings: bool = False, overwrite: bool = False,
                      skip_existing: bool = False, progress: bool = True, dist: distributed.Dist | None = None,
                      colors: str | Mapping[str, tuple[int, int, int]] | None = None,
                      on_scene: Callable[[dict], None] | None = None, **outputs: str | None) -> list[dict]:
        """Segment several rasters (files, VRTs, folders of rasters: :func:`coninfer.collection.expand_inputs`)
        into one output set per input in ``output_dir``, each in its input's CRS and grid: ``<stem>.tif``,
        ``<stem>.json`` and the kinds in ``outputs`` as name templates (``probabilities="{stem}_probs.tif"``,
        ``vector="{stem}.gpkg"``...). Returns the reports in input order (``{"input", "skipped": True}`` for
        an input ``skip_existing`` skipped because all its outputs exist: a stopped run continues where it
        stopped; in the collection context such an input still takes part in the mixture, unwritten).

        ``options.context``: ``scene`` (one mixture per input), ``batch``, ``none``, or ``collection``: one
        mixture over every tile of every input (one area cut into many files, a time series), as
        :func:`~coninfer.pipeline.solve_store` fits over one scene, so a mosaic cut into strips of whole tile
        rows gives the mosaic's result. Every input is opened and checked, and every output checked, before any
        work. Under torch.distributed, whole scenes go to the ranks when there are at least as many as ranks
        (:func:`coninfer.collection.share_scenes`); the outputs do not depend on the world size. ``on_scene``
        is called on rank 0 with each report (as each scene finishes in one process; at the end otherwise).
        """
        from coninfer import collection

        started = time.perf_counter()
        dist = dist or distributed.current()
        plans = collection.agree(dist, lambda: collection.plan_scenes(
            collection.expand_inputs(paths), output_dir, outputs, overwrite=overwrite,
            skip_existing=skip_existing))[dist.rank]
        palette = self.colors(colors)  # a bad colour fails before any work
        # a collection's skipped inputs still take part in its mixture: only their outputs are left as they are
        todo = [plan for plan in plans if not plan.skipped or options.context == "collection"]
        share = collection.share_scenes(len(todo), dist)
        # every input this rank runs is opened and checked first: a bad 900th file stops the run before any work
        opened = collection.agree(dist, lambda: [self._open_checked(todo[i].source, options, bands, nodata)
                                                 for i in share.mine])[dist.rank]
        scenes = dict(zip(share.mine, opened, strict=True))
        skipped = [{"input": str(plan.source), "skipped": True,
                    "outputs": {name: str(path) for name, path in plan.outputs.items()}}
                   for plan in plans if plan.skipped]
        report_now = on_scene if on_scene is not None and not dist.grouped else None
        for report in skipped if report_now else ():
            report_now(report)
        run = dict(workdir=workdir, resume=resume, keep_workdir=keep_workdir, keep_embeddings=keep_embeddings,
                   overwrite=overwrite, progress=progress and dist.is_main, on_scene=report_now)
        if options.context == "collection":
            done = self._segment_collection(todo, share, scenes, options, dist=dist, started=started,
                                            colors=palette, **run)
        else:
            done = self._segment_each(todo, share, scenes, options, dist=dist, colors=colors, **run)
        by_input = {str(report["input"]): report for report in skipped}
        reports = [by_input[str(plan.source)] if plan.skipped else done[plan.index] for plan in plans]
        if on_scene is not None and dist.grouped and dist.is_main:
            for report in reports:
                on_scene(report)
        return reports

    def _open_checked(self, source, options: SceneOptions, bands, nodata) -> read.Scene:
        """An input (a path, or a scene opened already) opened and checked before any work: bands, nodata, and
        the memory a run of it needs."""
        if isinstance(source, read.Scene):
            scene = source
        else:
            with gdal_env(source):
                scene = read.open_scene(source, bands=bands, nodata=nodata)
        if read.scene_is_empty(scene):
            raise InputError(f"{scene.path} is entirely nodata", hint="check the nodata value / mask of the input")
        check_memory(run_shape(self.models, self.settings, scene_grid(scene.width, scene.height, options), options),
                     device=self.models.device)
        return scene

    def _segment_each(self, todo: list, share, scenes: dict, options: SceneOptions, *, dist: distributed.Dist,
                      on_scene: Callable[[dict], None] | None, colors, **run) -> dict[int, dict]:
        """``scene``, ``batch`` and ``none`` contexts: :meth:`segment_file` per input, on this rank's scenes
        alone (whole scenes per rank) or with every rank (``share.store_dist`` is the run's)."""
        from coninfer import collection

        reports: dict[int, dict] = {}
        failure = None
        for index in share.mine:
            plan = todo[index]
            extras = {name: path for name, path in plan.requested.items() if name != "class_map"}
            try:
                reports[plan.index] = self.segment_file(scenes[index], plan.outputs["class_map"], options,
                                                        dist=share.store_dist, colors=colors, **run, **extras)
            except Exception as error:  # noqa: BLE001 - raised by agree() on this rank, named on the others
                failure = error
                break
            if on_scene is not None:
                on_scene(reports[plan.index])
        if not share.whole:  # every rank ran every scene and holds rank 0's reports
            return collection.agree(dist, lambda: reports, error=failure)[0]
        merged: dict[int, dict] = {}
        for part in collection.agree(dist, lambda: reports, error=failure):
            merged.update(part)
        return merged

    def _segment_collection(self, todo: list, share, scenes: dict, options: SceneOptions, *,
                            dist: distributed.Dist, started: float, workdir, resume: bool, keep_workdir: bool,
                            keep_embeddings: bool, overwrite: bool, progress: bool, colors: list,
                            on_scene: Callable[[dict], None] | None) -> dict[int, dict]:
        """The ``collection`` context: each scene's embeddings and priors in its own (resumable) store, by the
        ranks that run it; one mixture over the :class:`~coninfer.collection.CollectionStore` of all of them,
        fitted by every rank; then each rank stitches and writes its scenes (not the skipped ones, which only
        take part in the mixture). Rank 0 holds every output and work folder for the run."""
        from contextlib import ExitStack

        from coninfer import collection

        patches = self.models.grid_size(self.settings.model_res) ** 2
        num_queries = len(self.models.classes.queries)

        def part(scene) -> collection.StorePart:
            folder = self._workdir(scene, options, workdir)
            return collection.StorePart(folder, self._query_folder(folder, options),
                                        len(scene_grid(scene.width, scene.height, options)))

        mine = {index: part(scenes[index]) for index in share.mine}
        parts_by: dict[int, collection.StorePart] = {}
        for gathered in collection.agree(dist, lambda: mine):
            parts_by.update(gathered)
        parts = [parts_by[index] for index in range(len(todo))]
        written = [plan for plan in todo if not plan.skipped]
        with ExitStack() as held:
            def hold() -> None:
                if not dist.is_main:
                    return
                collection.raise_open_file_limit(sum(len(plan.outputs) + 1 for plan in written) + 1024)
                for plan in written:
                    held.enter_context(_fs.hold_outputs(plan.outputs.values()))
                    check_outputs(plan.source, plan.outputs, overwrite=overwrite)  # again, now that it is held
                for folder in dict.fromkeys(item.folder for item in parts):
                    held.enter_context(locked_folder(folder))

            collection.agree(dist, hold)
            if dist.grouped and parts:
                distributed.check_shared_folder(dist, parts[0].folder.parent)
            timings: dict[int, dict[str, float]] = {}
            resumed: dict[int, int] = {}

            def encode_mine() -> None:
                for index in share.mine:
                    timings[index], resumed[index] = self._encode_part(
                        scenes[index], parts[index], options, resume=resume, progress=progress,
                        dist=share.store_dist)

            collection.agree(dist, encode_mine)
            tick = time.perf_counter()
            view = collection.CollectionStore(parts, patches, num_queries)
            try:
                solve_store(view, self.settings, options, device=self.models.device, dist=dist)
            finally:
                view.close()
            solve_s = time.perf_counter() - tick
            info = {"scenes": len(todo), "tiles": int(view.shape[0])}
            ours = share.mine if share.whole else distributed.split(dist, list(range(len(todo))))
            writers = [index for index in ours if not todo[index].skipped]

            def write_mine() -> dict[int, dict]:
                reports = {}
                for index in writers:
                    scene_timings = {**timings[index], "solve_s": solve_s}
                    reports[todo[index].index] = self._write_part(
                        scenes[index], parts[index], todo[index].outputs, options, scene_timings,
                        resumed_from=resumed[index], started=started, overwrite=overwrite, progress=progress,
                        colors=colors, collection_info={**info, "index": index})
                    if on_scene is not None:
                        on_scene(reports[todo[index].index])
                return reports

            done: dict[int, dict] = {}
            for gathered in collection.agree(dist, write_mine):
                done.update(gathered)
            if dist.is_main and not keep_workdir:
                for item in parts:
                    shutil.rmtree(item.folder if not keep_embeddings else item.queries, ignore_errors=True)
        return done

    def _encode_part(self, scene, part, options: SceneOptions, *, resume: bool, progress: bool,
                     dist: distributed.Dist) -> tuple[dict[str, float], int]:
        """A collection scene's encode and prior passes into its store (every rank of ``dist`` on its share of
        the missing tiles); returns their timings and the tiles an earlier run had stored."""
        grid = scene_grid(scene.width, scene.height, options)
        store = self._open_store(part.folder, part.queries, part.num_tiles, resume=resume, source=scene.path,
                                 dist=dist)

        try:
            with gdal_env(scene.path), file_reader(scene) as read_tile:
                timings = self._encode_and_prior(read_tile, grid, store, options, progress=progress, dist=dist)
        finally:
            store.close()
            store.embeddings.close()
        return timings, store.resumed_from

    def _write_part(self, scene, part, targets: dict[str, Path], options: SceneOptions, timings: dict[str, float],
                    *, resumed_from: int, started: float, overwrite: bool, progress: bool, colors: list,
                    collection_info: dict) -> dict:
        """Stitch a solved collection scene from its store and write its outputs; returns its report."""
        grid = scene_grid(scene.width, scene.height, options)
        embeddings = EmbeddingStore(part.folder, part.num_tiles, self.models.grid_size(self.settings.model_res) ** 2)
        store = TileStore(part.queries, part.num_tiles, embeddings.shape[1], len(self.models.classes.queries),
                          embeddings=embeddings)
        store.resumed_from = resumed_from
        try:
            with gdal_env(scene.path), file_reader(scene) as read_tile:
                blocks = stitch_scene(self.models, self.settings, read_tile, grid, store, progress=progress,
                                      probabilities=needs_probabilities(targets))

                def summarize(counts: np.ndarray, areas: np.ndarray) -> dict:
                    timings["total_s"] = time.perf_counter() - started
                    report = self._report(scene, options, counts, areas, targets, timings, store, colors)
                    return {**report, "collection": collection_info}

                return write_outputs(targets, scene, list(self.class_names), colors, blocks, summarize, timings,
                                     overwrite=overwrite)
        finally:
            store.close()
            embeddings.close()


def _json_number(value):
    """A number JSON can hold: NaN (a valid nodata value) as the string "nan"."""
    return "nan" if isinstance(value, float) and value != value else value


def _input_identity(path) -> dict:
    """The input file as the resume key sees it; ctime and inode change whenever the file is rewritten, even by
    tools that restore its mtime. Virtual paths (URLs) have no stat: their path names them."""
    if is_virtual(path):
        return {"input": str(path)}
    stat = Path(path).stat()
    return {"input": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
            "ctime": stat.st_ctime_ns, "inode": stat.st_ino}


def _as_numpy(array, name: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, on any device
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0:
        raise InputError(f"{name} is empty (shape {array.shape})", hint="pass an image with at least one pixel")
    return array


def _check_classes(classes: ClassList, settings: InferenceSettings) -> None:
    """Checks that need both the classes and the settings, done before any model is loaded."""
    count = len(classes.names)
    if count > NODATA_LABEL:
        raise InputError(f"{count} classes, at most {NODATA_LABEL} fit a uint8 class map ({NODATA_LABEL} is nodata)",
                         hint="merge classes as synonyms (a,b) or split the run")
    if settings.post.bg_index >= count:
        raise InputError(f"--bg-index {settings.post.bg_index} is not a class index (0..{count - 1})",
                         hint="give the background class's position in the class list")


def _as_class_list(classes: ClassList | str | Sequence[str]) -> ClassList:
    if isinstance(classes, ClassList):
        return classes
    if isinstance(classes, str):
        return ClassList.parse(classes)
    return ClassList.from_names(list(classes))
