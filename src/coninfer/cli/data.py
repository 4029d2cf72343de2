"""`coninfer data`: list the 17 benchmarks and convert their downloads into the evaluation layout."""

from __future__ import annotations

from pathlib import Path

import click

_CONVERT_EXAMPLES = """
\b
Examples:
  coninfer data convert potsdam downloads/potsdam data/potsdam
  coninfer data convert LoveDA downloads/LoveDA data/LoveDA
  coninfer data convert wbs-si downloads/WaterBodiesDatasetPreprocessed \\
      data/water_body_segmentation/WaterBodiesDatasetPreprocessed

RAW_DIR layout per dataset: `coninfer data list --layout`. UDD5 and VDD are used as
released: pass the release folder as both RAW_DIR and OUT_DIR to only check it.
"""


@click.group("data")
def data() -> None:
    """Prepare benchmark datasets (list, convert)."""


@data.command("list")
@click.option("--layout", is_flag=True, help="Also print what RAW_DIR must contain for each dataset.")
def list_datasets(layout: bool) -> None:
    """List the benchmarks with their metric, class count and converter."""
    from coninfer.evaluate.converters import converter_kind
    from coninfer.evaluate.specs import dataset_names, load_dataset_spec

    header = f"{'dataset':<14} {'metric':<15} {'classes':>7}  {'converter':<24} images"
    click.echo(header)
    for name in dataset_names():
        spec = load_dataset_spec(name)
        size = str(spec.eval_set_size) if spec.eval_set_size else "-"
        click.echo(f"{name:<14} {spec.metric:<15} {spec.num_classes:>7}  {converter_kind(name):<24} {size}")
        if layout:
            click.echo(f"    RAW_DIR: {spec.converter.raw_layout}")


@data.command("convert", epilog=_CONVERT_EXAMPLES)
@click.argument("dataset")
@click.argument("raw_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on a terminal.")
def convert(dataset: str, raw_dir: Path, out_dir: Path, progress: bool) -> None:
    """Convert DATASET (case-insensitive) from RAW_DIR (the download) into OUT_DIR (the evaluation data root).

    Checks the raw layout first; reruns skip what is already converted.
    """
    from coninfer.evaluate.converters import convert_dataset

    summary = convert_dataset(dataset, raw_dir, out_dir, progress=progress)
    click.echo(str(summary))
