"""Options shared by `segment` and `eval`, declared once. Defaults come from :mod:`coninfer.settings` (an option
left out is None and keeps the settings' default), so each default is written in one place."""

from __future__ import annotations

import click

from coninfer.settings import CONTEXTS, METHODS, PRIORS, VARIANTS, InferenceSettings, SceneOptions

_DEFAULTS = InferenceSettings()
_SCENE = SceneOptions()


def _stack(*decorators):
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


COMPILE_HELP = ("torch.compile both encoders (off by default): the first batches compile (seconds to minutes, two "
                "or three times a run), later ones may run faster (on a 2-core CPU they did not, README 'Speed'); "
                "labels as eager up to float rounding. Needs a C++ compiler on the CPU; a failure stops the run "
                "with a hint.")


def model_options(*, vfm_default: str | None, vfm_help: str, compile_option: bool = False):
    """--vlm, --vfm, --device, --precision; with ``compile_option`` also --compile (``compile_models``).

    ``compile_option`` is opt-in so that a command adds --compile together with the parameter that receives it."""
    compile_flag = [click.option("--compile", "compile_models", is_flag=True, help=COMPILE_HELP)] if compile_option else []
    return _stack(
        click.option("--vlm", default="clip-b16", show_default=True,
                     help="CLIP preset, local checkpoint/folder or hub id (`coninfer models list`)."),
        click.option("--vfm", default=vfm_default, show_default=vfm_default is not None, help=vfm_help),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
                     show_default=True,
                     help="auto = fp16 on CUDA; on the CPU bf16 where it multiplies bf16 natively (AVX512-BF16 or "
                          "AMX-BF16: DINOv3-L 5x faster, labels not identical, README 'Speed'), else fp32. "
                          "fp32 = exact parity with the official code."),
        *compile_flag,
    )


def method_options(*, lambda_default_help: str):
    """--method, --vlm-variant, --attn-lambda, --temperature, --iterations, --vfm-features."""
    return _stack(
        click.option("--method", type=click.Choice(METHODS), default=_DEFAULTS.method, show_default=True,
                     help="coninfer = joint context solver; decoupled = mixture fitted on the features alone, then "
                          "fused with the prior (paper Table 4); baseline = the CLIP prior alone (MaskCLIP*)."),
        click.option("--vlm-variant", type=click.Choice(VARIANTS), default=None,
                     help=f"Dense CLIP variant with its Table-2 settings [default: {_DEFAULTS.clip.variant}].")
        ,
        click.option("--attn-lambda", type=click.FloatRange(0.0, 1.0), default=None,
                     help=f"Mid-layer attention fusion weight, 0-1 [default: {lambda_default_help}]."),
        click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=None,
                     help=f"Solver temperature τ [default: {_DEFAULTS.solver.temperature:g}]."),
        click.option("--iterations", type=click.IntRange(min=0), default=None,
                     help=f"Solver EM iterations [default: {_DEFAULTS.solver.iterations}]."),
        click.option("--vfm-features", type=click.Choice(["vfm", "clip"]), default=_DEFAULTS.features,
                     show_default=True, help="Where the solver's features come from (clip = paper Table 4 ablation)."),
        click.option("--prior", type=click.Choice(PRIORS), default=_DEFAULTS.prior, show_default=True,
                     help="The per-patch prior: the dense CLIP, or SegEarth-OV (SimFeatUp-upsampled, [CLS]-debiased, "
                          "pooled to the patch grid: the paper's +SegEarth-OV rows; needs --upsampler)."),
        click.option("--upsampler", help="SimFeatUp weights for --prior segearth-ov: a preset (simfeatup-clip-b16; "
                                         "tiny-random offline), a local .ckpt/.safetensors or a hub file "
                                         "owner/repo/file.ckpt (`coninfer models list`)."),
    )


def scene_options():
    """--tile-size, --overlap, --context, --context-size, --batch-size, --model-res."""
    return _stack(
        click.option("--context", type=click.Choice(CONTEXTS), default=_SCENE.context, show_default=True,
                     help="Tiles per solver run: the whole scene (one mixture per input), every tile of every "
                          "input (collection: one mixture over all), --context-size tiles (batch, paper), or none "
                          "(prior only)."),
        click.option("--context-size", type=int, default=_SCENE.context_size, show_default=True,
                     help="Tiles per solver run for --context batch."),
        click.option("--tile-size", type=int, default=_SCENE.tile_size, show_default=True,
                     help="Tile side in source pixels (resized to --model-res; 448 keeps the source resolution)."),
        click.option("--overlap", type=int, default=_SCENE.overlap, show_default=True,
                     help="Tile overlap in source pixels; probabilities are blended linearly across it."),
        click.option("--model-res", type=int, default=_DEFAULTS.model_res, show_default=True,
                     help="Model input side in pixels."),
        click.option("--batch-size", type=int, default=_SCENE.batch_size, show_default=True,
                     help="Tiles per encoder batch (halved automatically on CUDA out-of-memory)."),
    )
