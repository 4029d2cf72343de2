"""`coninfer eval`: score ConInfer (or the baseline) on the paper's benchmarks, beside the paper's numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from coninfer.errors import InputError, InputFileError

EXAMPLES = """
\b
Examples:
  coninfer eval OpenEarthMap --data-root data/ --output oem.json
  coninfer eval all --data-root data/ --output results.json --markdown results.md
  coninfer eval Potsdam --data-root data/ --method baseline            # MaskCLIP* row
  coninfer eval Potsdam --data-root data/ --vlm-variant clearclip      # Table 2 (plug-and-play)
  coninfer eval Potsdam --data-root data/ --vfm-features clip          # Table 4 (context from CLIP)
  coninfer eval Potsdam --data-root data/ --vlm tiny-random --vfm tiny-random --limit 4   # offline smoke run
"""

# the VFM of each dataset's config (``ConInferSettings.vfm``) -> its preset
_VFM_PRESETS = {"dinov3_vitl16_sat493m": "dinov3-l16-sat", "dinov3_vith16plus_lvd1689m": "dinov3-h16plus-lvd"}


@click.command(epilog=EXAMPLES)
@click.argument("dataset")
@click.option("--data-root", type=click.Path(path_type=Path), required=True,
              help="Folder of the converted dataset, or a SegEarth-OV style data/ folder holding several "
              "(required for `all`: each dataset is looked for in its own subfolder, e.g. data/potsdam).")
@click.option("--method", type=click.Choice(["coninfer", "baseline"]), default="coninfer", show_default=True,
              help="baseline = CLIP prior alone (the paper's MaskCLIP* row).")
@click.option("--vlm", default="clip-b16", show_default=True, help="CLIP preset, path or hub id.")
@click.option("--vfm", default=None, help="VFM preset/path [default: the paper's per dataset: DINOv3 ViT-L/16 SAT, "
              "ViT-H+/16 LVD for UAVid and VDD]. Pixels get the SAT-493M statistics, as in the reference code. "
              "Unused by --method baseline and --vfm-features clip.")
@click.option("--vlm-variant", type=click.Choice(["maskclip", "sclip", "clearclip", "segearth"]), default=None,
              help="Dense CLIP variant with its Table-2 settings [default: segearth with the dataset's lambda].")
@click.option("--attn-lambda", type=click.FloatRange(0.0, 1.0), default=None,
              help="Mid-layer attention fusion weight, 0-1 [default: the dataset's config, 0.6 or 0.1; "
              "with --vlm-variant: that variant's].")
@click.option("--vfm-features", type=click.Choice(["vfm", "clip"]), default="vfm", show_default=True,
              help="Where the solver's features come from (clip = paper Table 4 ablation).")
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True, help="auto = fp16 on CUDA, fp32 on CPU.")
@click.option("--overwrite", is_flag=True, help="Replace existing --output / --markdown files (finished datasets "
              "are read back from the saved state, not recomputed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-dataset messages.")
def eval_command(dataset: str, data_root: Path, method: str, vlm: str, vfm: str | None, vlm_variant: str | None,
                 attn_lambda: float | None, vfm_features: str, context_size: int, limit: int | None,
                 output: Path | None, markdown: Path | None, state_dir: Path | None, device: str, precision: str,
                 overwrite: bool, quiet: bool) -> None:
    """Evaluate on DATASET (one of `coninfer data list`, or `all`) and compare with the paper.

    Prints Table 1 (mIoU) and/or Table 3 (foreground IoU) with our value, the paper's and the difference.
    Progress is saved after every batch of images: rerunning the same command continues where it stopped,
    and a finished dataset is not predicted again.

    `all` evaluates every benchmark found under --data-root (each in its folder, e.g. data/potsdam),
    lists the ones not found on stderr, and exits with an error only when none is found.
    """
    from coninfer.evaluate import format_report, write_results_json
    from coninfer.prompts import default_cache_dir
    from coninfer.raster.write import atomic_path, check_output_path

    for target in (output, markdown):
        if target is not None:
            check_output_path(target, overwrite=overwrite)
    if not data_root.is_dir():
        raise InputError(f"--data-root {data_root} is not a folder",
                         hint="convert the data first: coninfer data convert DATASET RAW_DIR OUT_DIR")
    found = _datasets_to_evaluate(dataset, data_root)
    run = RunOptions(method=method, vlm=vlm, vfm=vfm, vlm_variant=vlm_variant, attn_lambda=attn_lambda,
                     vfm_features=vfm_features, context_size=context_size, limit=limit,
                     state_root=state_dir or default_cache_dir() / "eval", progress=not quiet)
    encoders = EncoderCache(device, precision)
    results = []
    for spec, root in found:
        if len(found) > 1 and not quiet:
            click.echo(f"== {spec.name}", err=True)
        results.append(evaluate_one(spec, root, encoders, run))
        if output is not None:  # after every dataset, so a long `eval all` keeps what it has
            write_results_json(results, output)
    table = format_report(results)
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


@dataclass(frozen=True)
class RunOptions:
    """The command-line choices shared by every dataset of one `coninfer eval` run."""

    method: str
    vlm: str
    vfm: str | None
    vlm_variant: str | None
    attn_lambda: float | None
    vfm_features: str
    context_size: int
    limit: int | None
    state_root: Path
    progress: bool

    @property
    def needs_vfm(self) -> bool:
        return self.method == "coninfer" and self.vfm_features == "vfm"


class EncoderCache:
    """Loads the encoders on first use (a finished, resumed dataset loads none) and keeps the last pair, so
    that `eval all` loads each model once while holding one set of weights in memory."""

    def __init__(self, device: str, precision: str) -> None:
        from coninfer.tile_step import resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self._key: tuple[str, str | None] | None = None
        self._encoders: tuple[Any, Any] = (None, None)

    def get(self, vlm: str, vfm: str | None) -> tuple[Any, Any]:
        """(DenseCLIP, DenseVFM or None) for these presets/paths."""
        from coninfer.encoders import presets

        if self._key != (vlm, vfm):
            self._encoders = (None, None)  # free the old weights before loading new ones
            clip = presets.load_vlm(vlm, device=self.device, dtype=self.dtype)
            vfm_model = presets.load_vfm(vfm, device=self.device, dtype=self.dtype) if vfm else None
            self._key, self._encoders = (vlm, vfm), (clip, vfm_model)
        return self._encoders


def evaluate_one(spec, data_root: Path, encoders: EncoderCache, run: RunOptions):
    """Evaluate one dataset with the paper's per-dataset settings (overridden by ``run``); returns an EvalResult.

    The state file's name hashes every setting that changes the result (and the data folder), so a rerun of
    the same command resumes it and a run with other settings starts its own.
    """
    from coninfer.evaluate import evaluate_dataset, list_samples
    from coninfer.prompts import ClassList
    from coninfer.settings import InferenceSettings
    from coninfer.tile_step import Models, infer_tiles

    config = spec.coninfer
    clip_settings = _clip_settings(config.attn_lambda, run.vlm_variant, run.attn_lambda)
    vfm_source = (run.vfm or _VFM_PRESETS[config.vfm]) if run.needs_vfm else None
    settings = InferenceSettings(clip=clip_settings).with_values(
        method=run.method, temperature=config.gmm_temp, logit_scale=config.logit_scale, bg_index=config.bg_idx,
        prob_thd=config.baseline_prob_thd if run.method == "baseline" else config.prob_thd,
        features=run.vfm_features)
    classes = ClassList.from_names(list(spec.class_lines))
    models: list[Models] = []  # built on the first batch

    def predict_batch(images):
        if not models:
            clip, vfm_model = encoders.get(run.vlm, vfm_source)
            # the reference code feeds every DINOv3 the SAT-493M statistics, also the LVD ViT-H+ (UAVid, VDD)
            models.append(Models(clip, vfm_model, classes, clip.encode_queries(list(classes.queries)),
                                 encoders.device, encoders.dtype,
                                 vfm_normalization=(config.vfm_mean, config.vfm_std) if vfm_model else None))
        return [result.labels for result in infer_tiles(models[0], images, settings)]

    run_settings = {"vlm": run.vlm, "vfm": vfm_source, "clip": asdict(clip_settings), "inference": asdict(settings),
                    "precision": str(encoders.dtype).removeprefix("torch.")}
    # the image list too: a rerun after more data was converted starts its own state instead of failing on the old
    names = [sample.name for sample in list_samples(spec, data_root)[: run.limit]]
    identity = {**run_settings, "context_size": run.context_size, "limit": run.limit,
                "data_root": str(data_root.resolve()), "images": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    state_path = run.state_root / f"{spec.name}-{run.method}-{digest}.json"
    return evaluate_dataset(spec, data_root, predict_batch, context_size=run.context_size, limit=run.limit,
                            state_path=state_path, progress=run.progress,
                            method="ConInfer" if run.method == "coninfer" else "baseline", settings=run_settings)


def _clip_settings(dataset_lambda: float, variant: str | None, attn_lambda: float | None):
    """The dataset's SegEarth settings, or a Table-2 variant's; ``attn_lambda`` overrides either λ."""
    from coninfer.settings import DenseCLIPSettings

    base = DenseCLIPSettings.for_variant(variant) if variant else DenseCLIPSettings("segearth", True, dataset_lambda)
    if attn_lambda is None:
        return base
    return dataclasses.replace(base, attn_lambda=attn_lambda)
