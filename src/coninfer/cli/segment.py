"""`coninfer segment`: raster scenes in, georeferenced class maps (and optional extras) out: one input with
``-o``, or many (files, folders, VRTs) with ``--output-dir``, one output set per input."""

from __future__ import annotations

from pathlib import Path

import click

from coninfer.cli._options import method_options, model_options, scene_options
from coninfer.errors import InputError
from coninfer.outputs import KINDS
from coninfer.settings import InferenceSettings

EXAMPLES = """
\b
Examples:
  coninfer segment scene.tif -o classes.tif --classes "building,roof;road;tree;low vegetation;water"
  coninfer segment scene.tif -o classes.tif --classes-file classes.txt --vector classes.gpkg --preview p.png
  coninfer segment ms.tif -o classes.tif --bands 3,2,1 --classes "building;road;water" --context batch
  coninfer segment scene.tif -o t.tif --classes "a;b" --vlm tiny-random --vfm tiny-random   # offline smoke test
  coninfer segment tiles/ extra.tif --output-dir out/ --classes "building;road;water" --preview "{stem}.png"
  coninfer segment 2021.tif 2022.tif 2023.tif --output-dir out/ --classes "building;water" --context collection
"""

_POST = InferenceSettings().post


def _output_option(name: str):
    kind = KINDS[name]
    return click.option(kind.option, name, type=click.Path(path_type=Path), help=kind.help)


@click.command(epilog=EXAMPLES)
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help=KINDS["class_map"].help + " One INPUT only.")
@click.option("--output-dir", type=click.Path(path_type=Path),
              help="Folder for one output set per INPUT (several inputs, or folders): <stem>.tif, <stem>.json, "
                   "and the other outputs as names holding {stem}, e.g. --probabilities {stem}_probs.tif.")
@click.option("--classes", "classes_text", help='Classes separated by ";", synonyms by ",": "building,roof;road".')
@click.option("--classes-file", type=click.Path(path_type=Path),
              help="Text file, one class per line, synonyms separated by commas.")
@click.option("--classes-preset", help="A benchmark's prompt list, e.g. openearthmap (`coninfer data list`).")
@click.option("--colors", help='Class colours, e.g. "building=#d7191c,water=#2b83ba" [default: from the names].')
@model_options(vfm_default="dinov3-l16-sat", vfm_help="DINOv3/DINOv2 preset, path or hub id.", compile_option=True)
@method_options(lambda_default_help="the variant's; 0.6 for segearth")
@scene_options()
@click.option("--bands", help="1-based band indexes read as R,G,B, e.g. 3,2,1 (default: first three).")
@click.option("--nodata", type=float, help="The input's nodata value, replacing the file's (e.g. -9999, nan).")
@click.option("--prob-thd", type=click.FloatRange(0.0, 1.0), default=_POST.prob_thd, show_default=True,
              help="Pixels whose top class probability is below this get --bg-index (0 = off).")
@click.option("--bg-index", type=click.IntRange(min=0), default=_POST.bg_index, show_default=True,
              help="Class index (0-based, in --classes order) given by --prob-thd.")
@_output_option("probabilities")
@_output_option("confidence")
@_output_option("vector")
@_output_option("preview")
@_output_option("report")
@_output_option("html")
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Folder for the resumable feature store [default: $CONINFER_CACHE/work or ~/.cache/coninfer/work].")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run with the same input and settings.")
@click.option("--keep-embeddings", is_flag=True,
              help="Keep the class-independent CLIP/VFM embeddings (~16 MB per megapixel) in the work folder, so a "
                   "rerun with other classes or solver settings runs no encoder (see `coninfer cache`).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--skip-existing", is_flag=True,
              help="With --output-dir: leave out the inputs whose outputs all exist (continue a stopped run).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no summary.")
def segment(inputs: tuple[str, ...], output: Path | None, output_dir: Path | None, classes_text: str | None, classes_file: Path | None,
            classes_preset: str | None, colors: str | None, vlm: str,
            vfm: str, device: str, precision: str, compile_models: bool, method: str, vlm_variant: str | None, attn_lambda: float | None,
            temperature: float | None, iterations: int | None, vfm_features: str, prior: str, upsampler: str | None,
            context: str, context_size: int,
            tile_size: int, overlap: int, model_res: int, batch_size: int, bands: str | None, nodata: float | None,
            prob_thd: float,
            bg_index: int, workdir: Path | None, resume: bool, keep_embeddings: bool, overwrite: bool,
            skip_existing: bool, quiet: bool, **extra_outputs: Path | None) -> None:
    """Segment INPUT (any raster GDAL reads: GeoTIFF, PNG, JPEG, VRT, /vsi… paths) into a class map with ConInfer;
    several INPUTs (or folders of rasters) with --output-dir."""
    from coninfer.outputs import check_outputs
    from coninfer.prompts import ClassList
    from coninfer.raster import read
    from coninfer.raster.source import gdal_env
    from coninfer.segmenter import Segmenter
    from coninfer.settings import SceneOptions

    if sum(value is not None for value in (classes_text, classes_file, classes_preset)) != 1:
        raise InputError("give exactly one of --classes, --classes-file and --classes-preset",
                         hint='e.g. --classes "building,roof;road;water" or --classes-preset openearthmap')
    if classes_preset is not None:
        from coninfer.class_presets import class_preset

        classes_text = class_preset(classes_preset)
    classes = ClassList.parse(classes_text) if classes_text is not None else ClassList.from_file(classes_file)
    if not 0 <= bg_index < len(classes.names):
        raise InputError(f"--bg-index {bg_index} is not a class index (0..{len(classes.names) - 1})")
    band_indexes = read.parse_bands(bands) if bands else None
    options = SceneOptions(tile_size=tile_size, overlap=overlap, context=context, context_size=context_size,
                           batch_size=batch_size)
    if context == "none":
        method = "baseline"  # the prior alone: the VFM would be loaded and run for nothing
    if prior == "segearth-ov" and not upsampler:
        raise InputError("--prior segearth-ov needs --upsampler", hint="pass --upsampler simfeatup-clip-b16 (SegEarth-OV's weights), a SimFeatUp .ckpt path, "
                         "or tiny-random for an offline smoke run")
    settings = InferenceSettings().with_values(model_res=model_res, method=method, features=vfm_features, prior=prior,
                                               temperature=temperature, iterations=iterations, prob_thd=prob_thd,
                                               bg_index=bg_index)
    input_path = _single_input(inputs, output, output_dir, skip_existing)
    if input_path is None:
        from coninfer import collection

        templates = {name: None if value is None else str(value) for name, value in extra_outputs.items()}
        # fail on bad inputs/outputs before loading any model
        collection.plan_scenes(collection.expand_inputs(inputs), output_dir, templates, overwrite=overwrite,
                               skip_existing=skip_existing)
        _segment_many(inputs, output_dir, templates, classes, options, settings, vlm=vlm, vfm=vfm, device=device,
                      precision=precision, vlm_variant=vlm_variant, attn_lambda=attn_lambda, upsampler=upsampler,
                      compile_models=compile_models,
                      bands=band_indexes, nodata=nodata, colors=colors, workdir=workdir, resume=resume,
                      keep_embeddings=keep_embeddings, overwrite=overwrite, skip_existing=skip_existing, quiet=quiet)
        return
    # fail on bad inputs/outputs before loading any model
    check_outputs(input_path, {"class_map": output, **extra_outputs}, overwrite=overwrite)
    from coninfer import distributed

    dist = distributed.setup(device)  # world size 1 unless launched by torchrun; then cuda:LOCAL_RANK
    click.get_current_context().call_on_close(distributed.teardown)
    quiet = quiet or not dist.is_main  # one progress bar and one summary, from rank 0
    with gdal_env(input_path):
        scene = read.open_scene(input_path, bands=band_indexes, nodata=nodata)
        if read.scene_is_empty(scene):
            raise InputError(f"{input_path} is entirely nodata", hint="check the nodata value / mask of the input")
        if colors:
            from coninfer.raster import style

            style.parse_colors(colors, classes)  # a bad --colors fails before any model is loaded
        segmenter = Segmenter.from_presets(classes, vlm=vlm, vfm=vfm, device=str(dist.device), precision=precision,
                                           settings=settings, clip_variant=vlm_variant, attn_lambda=attn_lambda,
                                           upsampler=upsampler, compile_models=compile_models)
        summary = segmenter.segment_file(  # the scene opened above: its stretch needed a read of the file
            scene, output, options, workdir=workdir, resume=resume, keep_embeddings=keep_embeddings,
            overwrite=overwrite, progress=not quiet, dist=dist,
            colors=colors, **extra_outputs)
    if not quiet:
        for row in summary["classes"]:
            click.echo(f"{row['class_name']:<24} {row['pixels']:>12} px  {row['area']:>14.1f} {row['area_unit']}")
        click.echo(f"wrote {output} ({summary['timings_s']['total_s']:.1f} s)")


def _single_input(inputs: tuple[str, ...], output: Path | None, output_dir: Path | None,
                  skip_existing: bool) -> str | None:
    """The input of a one-scene run (``-o``), or None for a run with ``--output-dir``; one line for a mix-up."""
    if output is not None and output_dir is not None:
        raise InputError("give -o/--output (one input) or --output-dir (one output set per input), not both",
                         hint="drop one of them")
    if output_dir is not None:
        return None
    if len(inputs) > 1:
        raise InputError(f"{len(inputs)} inputs but " + ("-o/--output names one class map" if output is not None
                                                        else "no --output-dir"),
                         hint="pass --output-dir DIR: each input gets DIR/<stem>.tif and its other outputs")
    if Path(inputs[0]).is_dir():
        raise InputError(f"input raster {inputs[0]} is a folder: its rasters need --output-dir",
                         hint="pass --output-dir DIR: each raster gets DIR/<stem>.tif and its other outputs")
    if output is None:
        raise InputError("no output given", hint="pass -o/--output classes.tif, or --output-dir DIR")
    if skip_existing:
        raise InputError("--skip-existing needs --output-dir", hint="with -o, the run stops if the output exists")
    return inputs[0]


def _segment_many(inputs, output_dir: Path, templates: dict, classes, options, settings, *, vlm: str, vfm: str,
                  device: str, precision: str, vlm_variant, attn_lambda, upsampler, compile_models: bool, bands, nodata, colors,
                  workdir, resume: bool, keep_embeddings: bool, overwrite: bool, skip_existing: bool,
                  quiet: bool) -> None:
    """``--output-dir``: :meth:`~coninfer.segmenter.Segmenter.segment_files`, one line per scene on stdout."""
    import time

    from coninfer import collection, distributed
    from coninfer.segmenter import Segmenter

    started = time.perf_counter()
    dist = distributed.setup(device)
    click.get_current_context().call_on_close(distributed.teardown)
    quiet = quiet or not dist.is_main
    if colors:
        from coninfer.raster import style

        style.parse_colors(colors, classes)  # a bad --colors fails before any model is loaded
    segmenter = Segmenter.from_presets(classes, vlm=vlm, vfm=vfm, device=str(dist.device), precision=precision,
                                       settings=settings, clip_variant=vlm_variant, attn_lambda=attn_lambda,
                                       upsampler=upsampler, compile_models=compile_models)
    reports = segmenter.segment_files(
        list(inputs), output_dir, options, bands=bands, nodata=nodata, workdir=workdir, resume=resume,
        keep_embeddings=keep_embeddings, overwrite=overwrite, skip_existing=skip_existing, progress=not quiet,
        dist=dist, colors=colors, on_scene=None if quiet else lambda report: click.echo(
            collection.summary_line(report)), **templates)
    if not quiet:
        written = sum(not report.get("skipped") for report in reports)
        skipped = f", {len(reports) - written} skipped" if written < len(reports) else ""
        click.echo(f"{written} scene(s) written to {output_dir}{skipped} ({time.perf_counter() - started:.1f} s)")
