"""`coninfer eval`: score ConInfer (or the baseline) on the paper's benchmarks, beside the paper's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coninfer.cli._options import method_options, model_options
from coninfer.errors import InputError, InputFileError
from coninfer.evaluate.protocol import SEGEARTH_PROTOCOLS

EXAMPLES = """
\b
Examples:
  coninfer eval OpenEarthMap --data-root data/ --output oem.json
  coninfer eval all --data-root data/ --output results.json --markdown results.md
  coninfer eval Potsdam --data-root data/ --method baseline            # MaskCLIP* row
  coninfer eval Potsdam --data-root data/ --vlm-variant clearclip      # Table 2 (plug-and-play)
  coninfer eval Potsdam --data-root data/ --vfm-features clip          # Table 4 (context from CLIP)
  coninfer eval Potsdam --data-root data/ --method decoupled           # Table 4 (no joint learning)
  coninfer eval Potsdam --data-root data/ --method baseline --vlm-variant gem               # GEM row
  coninfer eval Potsdam --data-root data/ --method baseline --prior segearth-ov --upsampler simfeatup-clip-b16
  coninfer eval WBS-SI --data-root data/ --method baseline --prior segearth-ov --upsampler simfeatup-clip-b16 \\
      --segearth-protocol coninfer-rerun --vlm-variant clearclip       # Table 2 ClearCLIP+SegEarth-OV
  coninfer eval Potsdam --data-root data/ --prior segearth-ov --upsampler simfeatup-clip-b16  # ConInfer on it
  coninfer eval Potsdam --data-root data/ --compare baseline.json --compare gem.json          # side by side
  coninfer eval Potsdam --data-root data/ --vlm tiny-random --vfm tiny-random --limit 4   # offline smoke run
"""



@click.command(epilog=EXAMPLES)
@click.argument("dataset")
@click.option("--data-root", type=click.Path(path_type=Path), required=True,
              help="Folder of the converted dataset, or a SegEarth-OV style data/ folder holding several "
              "(required for `all`: each dataset is looked for in its own subfolder, e.g. data/potsdam).")
@model_options(vfm_default=None, vfm_help="VFM preset/path [default: the paper's per dataset: DINOv3 ViT-L/16 SAT, "
               "ViT-H+/16 LVD for UAVid and VDD]. Pixels get the SAT-493M statistics, as in the reference code. "
               "Unused by --method baseline and --vfm-features clip.", compile_option=True)
@method_options(lambda_default_help="the dataset's config, 0.6 or 0.1; with --vlm-variant: that variant's")
@click.option("--context-size", type=click.IntRange(min=1), default=50, show_default=True,
              help="Images per solver run (the paper's batch size; results depend on it and on file order).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N images (file-name order) [default: all].")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Results JSON to write (a list, rewritten after every dataset).")
@click.option("--markdown", type=click.Path(path_type=Path), default=None,
              help="Also write the Markdown table (printed on stdout in any case) to this file.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where per-dataset progress is kept for resuming [default: $CONINFER_CACHE/eval, "
              "else ~/.cache/coninfer/eval].")
@click.option("--overwrite", is_flag=True, help="Replace existing --output / --markdown files (finished datasets "
              "are read back from the saved state, not recomputed).")
@click.option("--segearth-protocol", type=click.Choice(list(SEGEARTH_PROTOCOLS)), default=None,
              help="With --method baseline --prior segearth-ov: segearth-ov = SegEarth-OV's own protocol (long side "
              "resized to 448, 224/112 sliding windows, its prompts and thresholds; the SegEarth-OV rows), "
              "coninfer-rerun = ConInfer's re-run (448x448, one window, ConInfer's prompts and thresholds; Table 2 "
              "\"+SegEarth-OV\" rows with --vlm-variant) [default: segearth-ov]. Under --method coninfer/decoupled "
              "the prior is always the re-run's.")
@click.option("--compare", "compare_files", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="Results JSON of earlier runs (other methods) to show in the table beside "
              "this run's; repeat the option for several files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-dataset messages.")
def eval_command(dataset: str, data_root: Path, vlm: str, vfm: str | None, device: str, precision: str,
                 compile_models: bool, method: str, vlm_variant: str | None, attn_lambda: float | None, temperature: float | None,
                 iterations: int | None, vfm_features: str, prior: str, upsampler: str | None,
                 context_size: int, limit: int | None,
                 output: Path | None, markdown: Path | None, state_dir: Path | None, overwrite: bool,
                 segearth_protocol: str | None, compare_files: tuple[Path, ...], quiet: bool) -> None:
    """Evaluate on DATASET (one of `coninfer data list`, or `all`) and compare with the paper.

    Prints Table 1 (mIoU) and/or Table 3 (foreground IoU), and Table 2 for the plug-and-play variants, with our
    value, the paper's row of the same method (ConInfer, MaskCLIP*, GEM, SegEarth-OV, decoupled) and the
    difference; --compare adds earlier runs' results as more rows.
    Progress is saved after every batch of images: rerunning the same command continues where it stopped,
    and a finished dataset is not predicted again.

    `all` evaluates every benchmark found under --data-root (each in its folder, e.g. data/potsdam),
    lists the ones not found on stderr, and exits with an error only when none is found.
    """
    from coninfer import distributed
    from coninfer._fs import atomic_path, cache_dir, check_output_path
    from coninfer.evaluate import format_report, read_results_json, write_results_json
    from coninfer.evaluate.protocol import EncoderCache, RunOptions, evaluate_one

    dist = distributed.setup(device)  # world size 1 unless launched by torchrun
    click.get_current_context().call_on_close(distributed.teardown)
    quiet = quiet or not dist.is_main  # one progress bar and one table, from rank 0

    for target in (output, markdown):
        if target is not None:
            check_output_path(target, overwrite=overwrite)
    if not data_root.is_dir():
        raise InputError(f"--data-root {data_root} is not a folder",
                         hint="convert the data first: coninfer data convert DATASET RAW_DIR OUT_DIR")
    found = _datasets_to_evaluate(dataset, data_root)
    run = RunOptions(method=method, vlm=vlm, vfm=vfm, vlm_variant=vlm_variant, attn_lambda=attn_lambda,
                     vfm_features=vfm_features, context_size=context_size, limit=limit,
                     state_root=state_dir or cache_dir() / "eval", progress=not quiet, temperature=temperature,
                     iterations=iterations, prior=prior, upsampler=upsampler,
                     segearth_protocol=segearth_protocol)
    compared = [result for path in compare_files for result in read_results_json(path)]  # read before the run
    encoders = EncoderCache(str(dist.device), precision, compile_models=compile_models)  # cuda:LOCAL_RANK under torchrun
    results = []
    for spec, root in found:
        if len(found) > 1 and not quiet:
            click.echo(f"== {spec.name}", err=True)
        results.append(evaluate_one(spec, root, encoders, run))
        if output is not None and dist.is_main:  # after every dataset, so a long `eval all` keeps what it has
            write_results_json(results, output)
    if not dist.is_main:
        return
    table = format_report(compared + results)
    click.echo(table)
    if markdown is not None:
        with atomic_path(markdown) as temporary:
            temporary.write_text(table + "\n", encoding="utf-8")


def _datasets_to_evaluate(dataset: str, data_root: Path) -> list[tuple[Any, Path]]:
    """(spec, dataset folder) pairs to evaluate. One dataset: ``data_root`` or ``data_root/<root>`` (the loader
    decides and reports a missing folder). ``all``: only ``data_root/<root>`` of each benchmark; missing ones are
    listed on stderr (even with --quiet: results would silently lack them), none found at all is an error."""
    from coninfer.evaluate import dataset_names, load_dataset_spec

    if dataset.lower() != "all":
        return [(load_dataset_spec(dataset), data_root)]
    found, missing = [], []
    for name in dataset_names():
        spec = load_dataset_spec(name)
        folder = data_root / spec.layout.root
        # only the dataset's own subfolder: data_root itself may hold another dataset with the same img_dir
        if (folder / spec.layout.img_dir).is_dir():
            found.append((spec, folder))
        else:
            missing.append(f"{name} ({spec.layout.root}/{spec.layout.img_dir})")
    if not found:
        raise InputFileError(
            f"no benchmark found under {data_root}",
            hint="`all` expects converted datasets in their folders, e.g. "
            f"{data_root / 'potsdam' / 'img_dir' / 'val'}; see `coninfer data list --layout`",
        )
    if missing:
        click.echo(f"not found under {data_root}, skipped: {', '.join(missing)}", err=True)
    return found
