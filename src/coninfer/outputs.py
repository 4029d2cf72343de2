"""The outputs of a scene run, as one table: each kind says its file suffixes, its CLI help and how it is written.

Three kinds of writer: *block* writers receive every stitched block while the class map streams out (class map,
probabilities, confidence); *after* writers run once the class map is complete and read it back (its QGIS and
GDAL sidecars, vectors, preview); *report* writers run last, from the summary (JSON, HTML). Sidecar kinds are
*derived*: their path follows from the class map's, they are never given on their own. :func:`check_outputs` and :func:`write_outputs` iterate the table,
so a new output format is one row (and its writer in :mod:`coninfer.raster.write`).

Every output goes to a temporary file; all of them move into place together only when every one is done, so
a failed or killed run leaves none of them (:func:`coninfer._fs.atomic_path`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coninfer._fs import atomic_path, check_output_path, is_virtual_path, write_error
from coninfer.errors import ConInferError, InputError, OutputError
from coninfer.raster import read, report_html, style, vectors, write
from coninfer.raster.tiles import StitchedBlock


@dataclass(frozen=True)
class RunContext:
    """What the writers need besides their path: the scene (georeference, overview for the preview), the class
    names, and the staged (temporary) and final paths of every output of the run."""

    scene: Any
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    staged: Mapping[str, Path]
    final: Mapping[str, Path]


@dataclass(frozen=True)
class OutputKind:
    """One output: ``name`` (key in the report), ``option`` (CLI flag), accepted ``suffixes`` (None: any),
    ``help`` text, and at most one writer role: ``open_block_writer`` (a context manager receiving stitched
    blocks through ``write_block``), ``write_after`` (called once the class map is complete) or
    ``write_report`` (called with the summary). ``derived``: the path as a function of the class map's.
    ``needs_probabilities``: its ``write_block`` reads the blocks' probabilities (no other output makes the
    stitcher bring them to the host)."""

    name: str
    option: str
    suffixes: tuple[str, ...] | None
    help: str
    open_block_writer: Callable[[Path, RunContext], Any] | None = None
    write_block: Callable[[Any, StitchedBlock], None] | None = None
    write_after: Callable[[Path, RunContext], None] | None = None
    write_report: Callable[[Path, RunContext, dict], None] | None = None
    derived: Callable[[Path], Path] | None = None
    needs_probabilities: bool = False


def needs_probabilities(outputs: Iterable[str]) -> bool:
    """Whether any of the output kinds named reads the stitched blocks' probabilities."""
    return any(KINDS[name].needs_probabilities for name in outputs)


def _open_class_map(path: Path, run: RunContext):
    return write.ClassMapWriter(path, run.scene.georef, run.class_names, colors=run.colors)


def _open_confidence(path: Path, run: RunContext):
    return write.ConfidenceWriter(path, run.scene.georef)


def _write_sidecar(part: str) -> Callable[[Path, RunContext], None]:
    def write_sidecar(path: Path, run: RunContext) -> None:
        style.write_class_map_sidecars({part: path}, run.class_names, run.colors)

    return write_sidecar


def _write_html(path: Path, run: RunContext, summary: dict) -> None:
    report_html.write_report_html(path, summary, run.staged.get("preview"), run.colors)


def _open_probabilities(path: Path, run: RunContext):
    return write.ProbabilityWriter(path, run.scene.georef, run.class_names)


def _write_vector(path: Path, run: RunContext) -> None:
    vectors.write_vectors(path, run.staged["class_map"], run.class_names, layer=run.final["vector"].stem,
                          colors=run.colors)


def _write_preview(path: Path, run: RunContext) -> None:
    """PNG of the scene (decimated to 1024 px) under the written class map, with a legend."""
    import rasterio
    from rasterio.enums import Resampling

    rgb, _ = read.read_overview(run.scene, max_size=1024)
    with rasterio.open(run.staged["class_map"]) as src:
        labels = src.read(1, out_shape=rgb.shape[1:], resampling=Resampling.nearest)
    write.write_preview(path, rgb, labels, run.class_names, run.colors)


OUTPUTS: tuple[OutputKind, ...] = (
    OutputKind("class_map", "--output", (".tif", ".tiff"), "Class-map GeoTIFF (COG, uint8, nodata 255) to write.",
               open_block_writer=_open_class_map,
               write_block=lambda writer, block: writer.write(block.window, block.labels)),
    OutputKind("probabilities", "--probabilities", (".tif", ".tiff"),
               "Also write per-class probabilities (uint8 0-255, one band per class).",
               open_block_writer=_open_probabilities, needs_probabilities=True,
               write_block=lambda writer, block: writer.write(block.window, block.probs, block.valid)),
    OutputKind("confidence", "--confidence", (".tif", ".tiff"),
               "Also write the per-pixel top-class probability (uint8 0-255 COG) for quality control.",
               open_block_writer=_open_confidence, needs_probabilities=True,
               write_block=lambda writer, block: writer.write(block.window, block.probs, block.valid)),
    OutputKind("class_map_aux", "--output", None, "GDAL category names of the class map (<OUTPUT>.aux.xml).",
               write_after=_write_sidecar("aux"), derived=lambda out: style.class_map_sidecars(out)["aux"]),
    OutputKind("class_map_qml", "--output", None, "QGIS style of the class map (<OUTPUT stem>.qml).",
               write_after=_write_sidecar("qml"), derived=lambda out: style.class_map_sidecars(out)["qml"]),
    OutputKind("vector", "--vector", (".gpkg", ".geojson", ".json"),
               "Also write dissolved polygons per class (.gpkg/.geojson), area in m².", write_after=_write_vector),
    OutputKind("preview", "--preview", (".png",), "Also write a PNG preview with a legend.",
               write_after=_write_preview),
    OutputKind("report", "--report", (".json",), "JSON report path [default: OUTPUT with .json].",
               write_report=lambda path, run, summary: write.write_report(path, summary)),
    OutputKind("html", "--html", (".html", ".htm"),
               "Also write a self-contained HTML report (preview, legend, class table, settings).",
               write_report=_write_html),
)
KINDS = {kind.name: kind for kind in OUTPUTS}


def check_outputs(source: str | Path, given: Mapping[str, str | Path | None], *, overwrite: bool = False
                  ) -> dict[str, Path]:
    """The outputs of a run by kind (``report`` defaults to the class map with ``.json``), checked before any
    work is done.

    Raises:
        InputError: an unknown kind or suffix, or two outputs sharing one path.
        OutputError: an output that is the input, exists (without ``overwrite``), or lies in a missing or
            unwritable folder.
    """
    unknown = sorted(set(given) - set(KINDS))
    if unknown:
        raise InputError(f"unknown output kind(s) {unknown}", hint=f"use {', '.join(KINDS)}")
    if given.get("class_map") is None:
        raise InputError("no class map output given", hint="pass -o/--output classes.tif")
    values = dict(given)
    values["report"] = values.get("report") or Path(values["class_map"]).with_suffix(".json")
    for kind in OUTPUTS:
        if kind.derived is not None:
            values[kind.name] = kind.derived(Path(values["class_map"]))
    outputs = {name: Path(value) for name, value in values.items() if value is not None}
    for name, path in outputs.items():
        suffixes = KINDS[name].suffixes
        if path.is_dir():
            raise InputError(f"{KINDS[name].option} {path} is a folder, not a file name",
                             hint=f"name a file in it, e.g. {path / ('classes' + (suffixes[0] if suffixes else ''))}")
        if suffixes and path.suffix.lower() not in suffixes:
            found = repr(path.suffix) if path.suffix else "no extension"
            raise InputError(f"{KINDS[name].option} {path}: {found} is not a {name.replace('_', ' ')} file name",
                             hint=f"use a file name ending in {' or '.join(suffixes)}")
    if len({path.resolve() for path in outputs.values()}) != len(outputs):
        raise InputError("two outputs share one path", hint="give each output its own file name")
    inputs = [] if is_virtual_path(source) else [source]
    for target in outputs.values():
        check_output_path(target, overwrite=overwrite, inputs=inputs)
    return outputs


def write_outputs(*args, **kwargs) -> dict:
    """:func:`_write_outputs`, with a full disk or a failing driver as one line naming the output folder (the
    old outputs, if any, are untouched: nothing was moved yet)."""
    from rasterio._err import CPLE_BaseError  # GDAL's own errors (a failed TIFF write) are not RasterioErrors
    from rasterio.errors import RasterioError

    try:
        return _write_outputs(*args, **kwargs)
    except ConInferError:
        raise
    except (OSError, RasterioError, CPLE_BaseError) as error:
        folder = Path(next(iter(args[0].values()))).parent if args and args[0] else "the output folder"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, OSError) and error.errno is not None:
            raise write_error(folder, error) from error
        raise OutputError(f"cannot write the outputs in {folder}: {reason}",
                          hint="check the free space and permissions of the output folder") from error


def _write_outputs(outputs: Mapping[str, Path], run_scene, class_names: list[str], colors: list,
                  blocks: Iterable[StitchedBlock],
                  summarize: Callable[[np.ndarray, np.ndarray], dict], timings: dict[str, float], *,
                  overwrite: bool = False) -> dict:
    """Stream ``blocks`` into the block writers, run the after-writers, then write the report from
    ``summarize(counts, areas)`` (pixel count (C,) int64 and area (C,) float64 per class); all outputs move into
    place together at the end. Records ``stitch_write_s`` and ``<kind>_s`` in ``timings``. Returns the summary."""
    with ExitStack() as staging:
        staged = {name: staging.enter_context(atomic_path(path)) for name, path in outputs.items()}
        run = RunContext(run_scene, class_names, colors, staged, outputs)
        tick = time.perf_counter()
        counts = np.zeros(len(class_names), np.int64)
        areas = np.zeros(len(class_names), np.float64)
        with ExitStack() as writers:  # each writer commits its file only if every block was written
            open_writers = [(KINDS[name], writers.enter_context(KINDS[name].open_block_writer(staged[name], run)))
                            for name in outputs if KINDS[name].open_block_writer is not None]
            for block in blocks:
                for kind, writer in open_writers:
                    kind.write_block(writer, block)
                block_counts = write.count_classes(block.labels, len(class_names))
                counts += block_counts
                areas += write.class_areas(block.labels, block.window, run_scene.georef, len(class_names),
                                           block_counts)
        timings["stitch_write_s"] = time.perf_counter() - tick
        for name in outputs:
            if KINDS[name].write_after is not None:
                tick = time.perf_counter()
                KINDS[name].write_after(staged[name], run)
                if KINDS[name].derived is None:  # sidecars take no time worth reporting
                    timings[f"{name}_s"] = time.perf_counter() - tick
        summary = summarize(counts, areas)
        for name in outputs:
            if KINDS[name].write_report is not None:
                KINDS[name].write_report(staged[name], run, summary)
        for name, path in outputs.items():  # written meanwhile by something that holds no output lock
            if path.exists() and not overwrite:
                raise OutputError(f"{KINDS[name].option} {path} appeared while this run was working",
                                  hint="another program wrote it; pass --overwrite to replace it, or another path")
    return summary
