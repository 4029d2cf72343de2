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
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from coninfer import _fs
from coninfer.errors import InputError, OutputError
from coninfer.outputs import check_outputs, write_outputs
from coninfer.pipeline import (
    ArrayScene,
    MemoryStore,
    array_reader,
    encode_scene,
    file_reader,
    scene_grid,
    solve_store,
    stitch_scene,
)
from coninfer.prompts import ClassList
from coninfer.raster import read, report_html, style, write
from coninfer.raster.source import gdal_env, is_virtual
from coninfer.raster.tiles import NODATA_LABEL
from coninfer.settings import DenseCLIPSettings, InferenceSettings, SceneOptions
from coninfer.store import STORE_VERSION, TileStore, clear_folder, locked_folder
from coninfer.tile_step import Models, load_models

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
                     upsampler: str | Path | None = None) -> Segmenter:
        """Load ``vlm`` and (when the method needs one) ``vfm`` by preset name, path or hub id; embed the classes.

        ``clip_variant`` / ``attn_lambda`` override ``settings.clip`` (the paper's Table-2 variants).
        ``upsampler``: SimFeatUp weights (path or hub file) for ``settings.prior == "segearth-ov"``.
        """
        classes = _as_class_list(classes)
        if clip_variant or attn_lambda is not None:
            settings = dataclasses.replace(settings, clip=DenseCLIPSettings.for_variant(
                clip_variant or settings.clip.variant, attn_lambda=attn_lambda))
        _check_classes(classes, settings)
        models = load_models(classes, vlm=vlm, vfm=vfm if settings.needs_vfm else None, device=device,
                             precision=precision, clip_settings=settings.clip, cache_dir=cache_dir,
                             upsampler=str(upsampler) if upsampler else None)
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
        store = MemoryStore(len(grid), self.models.grid_size(self.settings.model_res) ** 2,
                            len(self.models.classes.queries))
        labels = np.full((scene.height, scene.width), NODATA_LABEL, np.uint8)
        probs = np.zeros((len(self.class_names), scene.height, scene.width), np.float32)
        with array_reader(scene) as read_tile:
            encode_scene(self.models, self.settings, read_tile, grid, store, batch_size=options.batch_size)
            solve_store(store, self.settings, options, device=self.models.device)
            for block in stitch_scene(self.models, self.settings, read_tile, grid, store):
                rows, cols = block.window.toslices()
                labels[rows, cols] = block.labels
                probs[:, rows, cols] = block.probs
        return labels, probs

    def segment_file(self, path: str | Path | read.Scene, out: str | Path, options: SceneOptions = SceneOptions(),
                     *, bands: Sequence[int] | None = None, nodata: float | None = None, workdir: str | Path | None = None, resume: bool = True,
                     keep_workdir: bool = False, overwrite: bool = False, progress: bool = True,
                     colors: str | Mapping[str, tuple[int, int, int]] | None = None,
                     **outputs: str | Path | None) -> dict:
        """Segment a raster file (or a scene opened with :func:`~coninfer.raster.read.open_scene`, then without
        ``bands``) into a class-map COG plus the optional ``outputs`` named by :data:`coninfer.outputs.OUTPUTS`
        (``probabilities=``, ``confidence=``, ``vector=``, ``preview=``, ``report=``, ``html=``); returns the
        report dict. ``colors`` overrides the palette chosen from the class names (``"building=#d7191c"`` or a
        mapping class name -> RGB); the same colours go to the class map, preview, vectors and reports.

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
        # held from this check to the final move: a concurrent run on the same outputs stops at once
        with _fs.hold_outputs(targets.values()), gdal_env(source):
            targets = check_outputs(source, targets, overwrite=overwrite)  # again, now that no one else writes
            scene = path if isinstance(path, read.Scene) else read.open_scene(path, bands=bands, nodata=nodata)
            if read.scene_is_empty(scene):
                raise InputError(f"{source} is entirely nodata", hint="check the nodata value / mask of the input")
            folder = self._workdir(scene, options, workdir)
            with locked_folder(folder):
                summary = self._run(scene, options, folder, targets, resume=resume, progress=progress,
                                    started=started, overwrite=overwrite, colors=palette)
                if not keep_workdir:
                    shutil.rmtree(folder, ignore_errors=True)
        return summary

    def _run(self, scene, options: SceneOptions, folder: Path, targets: dict[str, Path], *, resume: bool,
             progress: bool, started: float, overwrite: bool, colors: list) -> dict:
        grid = scene_grid(scene.width, scene.height, options)
        timings: dict[str, float] = {}
        store = self._open_store(folder, len(grid), resume=resume)
        try:
            with file_reader(scene) as read_tile:
                tick = time.perf_counter()
                encode_scene(self.models, self.settings, read_tile, grid, store, batch_size=options.batch_size,
                             progress=progress)
                timings["encode_s"] = time.perf_counter() - tick
                tick = time.perf_counter()
                solve_store(store, self.settings, options, device=self.models.device)
                timings["solve_s"] = time.perf_counter() - tick
                blocks = stitch_scene(self.models, self.settings, read_tile, grid, store, progress=progress)

                def summarize(counts: np.ndarray, areas: np.ndarray) -> dict:
                    timings["total_s"] = time.perf_counter() - started
                    return self._report(scene, options, counts, areas, targets, timings, store, colors)

                return write_outputs(targets, scene, list(self.class_names), colors, blocks, summarize, timings,
                                     overwrite=overwrite)
        finally:
            store.close()

    def _open_store(self, folder: Path, num_tiles: int, *, resume: bool) -> TileStore:
        patches = self.models.grid_size(self.settings.model_res) ** 2
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_folder(folder)
        except OSError as error:
            raise OutputError(f"cannot create the work folder {folder}: {error.strerror or error}",
                              hint="pass --workdir with a writable folder") from error
        store = TileStore(folder, num_tiles, patches, len(self.models.classes.queries))
        store.repair()  # damaged tile records (one warning) are encoded again; nothing damaged is read
        store.resumed_from = num_tiles - len(store.missing_tiles())  # tiles an earlier run already stored
        return store

    def _workdir(self, scene, options: SceneOptions, workdir: str | Path | None) -> Path:
        """``workdir`` (default: the coninfer cache's ``work``) / a hash of everything the store depends on."""
        root = Path(workdir) if workdir else _fs.cache_dir() / "work"
        key = json.dumps({
            "input": _input_identity(scene.path), "bands": scene.bands, "options": asdict(options),
            "settings": asdict(self.settings), "models": self.model_identity(),
            "queries": list(self.models.classes.queries), "version": STORE_VERSION,
        }, sort_keys=True, default=str)
        return root / hashlib.sha256(key.encode()).hexdigest()[:20]

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
