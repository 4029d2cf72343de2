"""`coninfer segment`: a raster scene in, a georeferenced class map (and optional extras) out."""

from __future__ import annotations

from pathlib import Path

import click

from coninfer.errors import InputError

EXAMPLES = """
\b
Examples:
  coninfer segment scene.tif -o classes.tif --classes "building,roof;road;tree;low vegetation;water"
  coninfer segment scene.tif -o classes.tif --classes-file classes.txt --vector classes.gpkg --preview p.png
  coninfer segment ms.tif -o classes.tif --bands 3,2,1 --classes "building;road;water" --context batch
  coninfer segment scene.tif -o t.tif --classes "a;b" --vlm tiny-random --vfm tiny-random   # offline smoke test
"""


@click.command(epilog=EXAMPLES)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Class-map GeoTIFF (COG, uint8, nodata 255) to write.")
@click.option("--classes", "classes_text", help='Classes separated by ";", synonyms by ",": "building,roof;road".')
@click.option("--classes-file", type=click.Path(path_type=Path),
              help="Text file, one class per line, synonyms separated by commas.")
@click.option("--vlm", default="clip-b16", show_default=True,
              help="CLIP preset, local checkpoint/folder or hub id (`coninfer models list`).")
@click.option("--vfm", default="dinov3-l16-sat", show_default=True, help="DINOv3/DINOv2 preset, path or hub id.")
@click.option("--method", type=click.Choice(["coninfer", "baseline"]), default="coninfer", show_default=True,
              help="baseline = the CLIP prior alone (MaskCLIP*), no solver.")
@click.option("--context", type=click.Choice(["scene", "batch", "none"]), default="scene", show_default=True,
              help="Tiles per solver run: the whole scene, --context-size tiles (paper), or none (prior only).")
@click.option("--context-size", type=int, default=50, show_default=True, help="Tiles per solver run for batch.")
@click.option("--tile-size", type=int, default=448, show_default=True,
              help="Tile side in source pixels (resized to --model-res; 448 keeps the source resolution).")
@click.option("--overlap", type=int, default=0, show_default=True,
              help="Tile overlap in source pixels; probabilities are blended linearly across it.")
@click.option("--model-res", type=int, default=448, show_default=True, help="Model input side in pixels.")
@click.option("--bands", help="1-based band indexes read as R,G,B, e.g. 3,2,1 (default: first three).")
@click.option("--temperature", type=float, default=50.0, show_default=True, help="Solver temperature.")
@click.option("--prob-thd", type=float, default=0.0, show_default=True,
              help="Pixels whose top class probability is below this get --bg-class (0 = off).")
@click.option("--bg-class", type=int, default=0, show_default=True, help="Class index for --prob-thd.")
@click.option("--probabilities", type=click.Path(path_type=Path),
              help="Also write per-class probabilities (uint8 0-255, one band per class).")
@click.option("--vector", type=click.Path(path_type=Path), help="Also write dissolved polygons (.gpkg/.geojson).")
@click.option("--preview", type=click.Path(path_type=Path), help="Also write a PNG preview with a legend.")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report path [default: OUTPUT with .json].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True, help="auto = fp16 on CUDA, fp32 on CPU.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Tiles per encoder batch (halved automatically on CUDA out-of-memory).")
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Folder for the resumable feature store [default: $CONINFER_CACHE/work or ~/.cache/coninfer/work].")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run with the same input and settings.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no summary.")
def segment(input_path: Path, output: Path, classes_text: str | None, classes_file: Path | None, vlm: str,
            vfm: str, method: str, context: str, context_size: int, tile_size: int, overlap: int,
            model_res: int, bands: str | None, temperature: float, prob_thd: float, bg_class: int,
            probabilities: Path | None, vector: Path | None, preview: Path | None, report: Path | None,
            device: str, precision: str, batch_size: int, workdir: Path | None, resume: bool, overwrite: bool,
            quiet: bool) -> None:
    """Segment INPUT (GeoTIFF, PNG or JPEG) into a class map with ConInfer."""
    from coninfer.prompts import ClassList
    from coninfer.raster import read
    from coninfer.scene import SceneOptions, Segmenter, check_outputs
    from coninfer.settings import InferenceSettings

    if (classes_text is None) == (classes_file is None):
        raise InputError("give exactly one of --classes and --classes-file",
                         hint='e.g. --classes "building,roof;road;water"')
    classes = ClassList.parse(classes_text) if classes_text is not None else ClassList.from_file(classes_file)
    if not 0 <= bg_class < len(classes.names):
        raise InputError(f"--bg-class {bg_class} is not a class index (0..{len(classes.names) - 1})")
    band_indexes = read.parse_bands(bands) if bands else None
    options = SceneOptions(tile_size=tile_size, overlap=overlap, context=context, context_size=context_size,
                           batch_size=batch_size)
    if context == "none":
        method = "baseline"  # the prior alone: the VFM would be loaded and run for nothing
    settings = InferenceSettings().with_values(model_res=model_res, method=method, temperature=temperature,
                                 prob_thd=prob_thd, bg_index=bg_class)
    # fail on bad inputs/outputs before loading any model
    check_outputs(input_path, output, probabilities=probabilities, vector=vector, preview=preview, report=report,
                  overwrite=overwrite)
    scene = read.open_scene(input_path, bands=band_indexes)
    if read.scene_is_empty(scene):
        raise InputError(f"{input_path} is entirely nodata", hint="check the nodata value / mask of the input")
    segmenter = Segmenter(classes, vlm=vlm, vfm=vfm, device=device, precision=precision, settings=settings)
    summary = segmenter.segment_file(  # the scene opened above: its stretch needed a read of the whole file
        scene, output, options, probabilities=probabilities, vector=vector,
        preview=preview, report=report, workdir=workdir, resume=resume, overwrite=overwrite, progress=not quiet)
    if not quiet:
        for row in summary["classes"]:
            click.echo(f"{row['class_name']:<24} {row['pixels']:>12} px  {row['area']:>14.1f} {row['area_unit']}")
        click.echo(f"wrote {output} ({summary['timings_s']['total_s']:.1f} s)")
