"""The paper's evaluation protocol: per-dataset settings from the official configs, the encoders shared
between datasets, and one fingerprint of everything that changes a result (so a rerun resumes).

Two ways to predict a dataset:

* ConInfer's tile step (:func:`coninfer.tile_step.infer_tiles`): ``coninfer``, ``decoupled`` and the ``baseline``
  prior alone, each with the CLIP prior or, refined by ConInfer, SegEarth-OV's prior (448² input, one window,
  pooled onto the patch grid);
* SegEarth-OV alone (``--method baseline --prior segearth-ov``), image by image at the image's own size
  (:func:`coninfer.segearth_ov.segment_image`), under one of two protocols (``--segearth-protocol``):
  ``segearth-ov``, SegEarth-OV's own (keep-ratio resize of the long side to 448, 224/112 sliding windows, its
  ``configs/cls_*.txt`` prompts and per-dataset ``prob_thd``/``bg_idx``/λ), or ``coninfer-rerun``, ConInfer's
  re-run (``configs_segov``: 448x448 resize, one window, ConInfer's prompts and thresholds; the "+SegEarth-OV"
  rows of Table 2 with ``--vlm-variant maskclip|sclip|clearclip``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coninfer.errors import InputError
from coninfer.evaluate.report import PRIOR_SUFFIX
from coninfer.settings import DenseCLIPSettings, InferenceSettings

_METHOD_LABELS = {"coninfer": "ConInfer", "decoupled": "ConInfer (decoupled)", "baseline": "baseline"}
"""The results' method names (the report compares "baseline" with the paper's MaskCLIP* row)."""
_VARIANT_ROWS = {"vanilla": "CLIP", "maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP", "gem": "GEM"}
"""The paper's row name of each dense-CLIP variant (Tables 1-3); "segearth" is the paper's own (MaskCLIP*)."""
SEGEARTH_PROTOCOLS = {"segearth-ov": "segearth_ov", "coninfer-rerun": "coninfer_rerun"}
"""``--segearth-protocol`` choices -> :data:`coninfer.segearth_ov.PROTOCOLS`."""


@dataclass(frozen=True)
class RunOptions:
    """The command-line choices shared by every dataset of one `coninfer eval` run.

    ``segearth_protocol`` (a key of :data:`SEGEARTH_PROTOCOLS`, None = the method's natural one) is only for
    ``prior="segearth-ov"``.
    """

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
    temperature: float | None = None
    iterations: int | None = None
    prior: str = "clip"
    upsampler: str | None = None
    segearth_protocol: str | None = None


class EncoderCache:
    """Loads the encoders on first use (a finished, resumed dataset loads none) and keeps the last pair, so
    that `eval all` loads each model once while holding one set of weights in memory. ``compile_models``
    (``--compile``): each encoder is torch-compiled once, when loaded; not part of a result's settings (like the
    thread count, it changes float rounding only)."""

    def __init__(self, device: str, precision: str, *, compile_models: bool = False) -> None:
        from coninfer.tile_step import check_compile_available, resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.compile_models = compile_models
        if compile_models:
            check_compile_available(self.device)  # before any dataset is read
        self._key: tuple[str, str | None] | None = None
        self._encoders: tuple[Any, Any] = (None, None)
        self._upsampler: tuple[str | None, Any] = (None, None)

    def get(self, vlm: str, vfm: str | None) -> tuple[Any, Any]:
        """(DenseCLIP, DenseVFM or None) for these presets/paths."""
        from coninfer.encoders import presets

        if self._key != (vlm, vfm):
            self._encoders = (None, None)  # free the old weights before loading new ones
            clip = presets.load_vlm(vlm, device=self.device, dtype=self.dtype)
            vfm_model = presets.load_vfm(vfm, device=self.device, dtype=self.dtype) if vfm else None
            if self.compile_models:
                from coninfer.tile_step import compile_encoder

                for encoder in (clip, vfm_model):
                    if encoder is not None:
                        compile_encoder(encoder)
            self._key, self._encoders = (vlm, vfm), (clip, vfm_model)
        return self._encoders

    def upsampler(self, source: str):
        """The SimFeatUp of ``source`` (preset, file or hub file), loaded once for every dataset."""
        from coninfer.encoders.simfeatup import load_simfeatup

        if self._upsampler[0] != source:
            self._upsampler = (source, load_simfeatup(source, device=self.device))
        return self._upsampler[1]


def evaluate_one(spec, data_root: Path, encoders: EncoderCache, run: RunOptions):
    """Evaluate one dataset with the paper's per-dataset settings (overridden by ``run``); returns an EvalResult.

    The state file's name hashes every setting that changes the result (and the data folder), so a rerun of
    the same command resumes it and a run with other settings starts its own.
    """
    from coninfer.evaluate import evaluate_dataset, list_samples

    settings = protocol_settings(spec, run)
    segearth = segearth_ov_settings(spec, run)
    if settings.prior == "segearth-ov" and not run.upsampler:
        raise InputError("--prior segearth-ov needs --upsampler",
                         hint="pass --upsampler simfeatup-clip-b16 (SegEarth-OV's weights), a SimFeatUp .ckpt path, "
                         "or tiny-random for an offline smoke run")
    if segearth is not None:
        predict_batch, run_settings = _segearth_ov_predictor(spec, encoders, run, settings, segearth)
    else:
        predict_batch, run_settings = _tile_step_predictor(spec, encoders, run, settings)
    run_settings["precision"] = str(encoders.dtype).removeprefix("torch.")
    # the image list too: a rerun after more data was converted starts its own state instead of failing on the old
    names = [sample.name for sample in list_samples(spec, data_root)[: run.limit]]
    identity = {**run_settings, "context_size": run.context_size, "limit": run.limit,
                "data_root": str(data_root.resolve()), "images": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    state_path = run.state_root / f"{spec.name}-{run.method}-{digest}.json"
    return evaluate_dataset(spec, data_root, predict_batch, context_size=run.context_size, limit=run.limit,
                            state_path=state_path, progress=run.progress,
                            method=method_label(settings, segearth), settings=run_settings)


def _tile_step_predictor(spec, encoders: EncoderCache, run: RunOptions, settings: InferenceSettings
                         ) -> tuple[Callable, dict[str, Any]]:
    """ConInfer's tile step over each batch of images (the batch is the solver's context)."""
    from coninfer.prompts import ClassList
    from coninfer.tile_step import Models, infer_labels

    config = spec.coninfer
    vfm_source = (run.vfm or config.vfm_preset) if settings.needs_vfm else None
    classes = ClassList.from_names(list(spec.class_lines))
    models: list[Models] = []  # built on the first batch

    def predict_batch(images):
        if not models:
            clip, vfm_model = encoders.get(run.vlm, vfm_source)
            upsampler = encoders.upsampler(run.upsampler) if settings.prior == "segearth-ov" else None
            # the reference code feeds every DINOv3 the SAT-493M statistics, also the LVD ViT-H+ (UAVid, VDD)
            models.append(Models(clip, vfm_model, classes, clip.encode_queries(list(classes.queries)),
                                 encoders.device, encoders.dtype,
                                 vfm_normalization=(config.vfm_normalization.mean, config.vfm_normalization.std)
                                 if vfm_model else None, upsampler=upsampler))
        return infer_labels(models[0], images, settings)  # left on the device: the confusion matrix is counted there

    return predict_batch, {"vlm": run.vlm, "vfm": vfm_source, "upsampler": run.upsampler,
                           "clip": asdict(settings.clip), "inference": asdict(settings)}


def _segearth_ov_predictor(spec, encoders: EncoderCache, run: RunOptions, settings: InferenceSettings, segearth
                           ) -> tuple[Callable, dict[str, Any]]:
    """SegEarth-OV alone, image by image at each image's own size (no context: the batch only groups images)."""
    import torch

    from coninfer.prompts import ClassList
    from coninfer.segearth_ov import segment_image

    own = segearth.slide_crop > 0  # SegEarth-OV's own configs slide; ConInfer's re-run does not
    # SegEarth-OV's configs/cls_*.txt where they differ from ConInfer's prompts/cls_*.txt (datasets.yaml)
    lines = [",".join(c.segearth_queries or c.queries) for c in spec.classes] if own else list(spec.class_lines)
    classes = ClassList.from_names(lines)
    loaded: list[tuple[Any, Any, Any]] = []

    def predict_batch(images):
        if not loaded:
            clip, _ = encoders.get(run.vlm, None)
            loaded.append((clip, encoders.upsampler(run.upsampler), clip.encode_queries(list(classes.queries))))
        clip, upsampler, queries = loaded[0]
        # labels stay on the device: the runner counts the confusion matrix there
        return [segment_image(clip, upsampler, image, queries, classes.query_to_class, segearth).labels
                .to(torch.uint8) for image in images]

    return predict_batch, {"vlm": run.vlm, "vfm": None, "upsampler": run.upsampler,
                           "clip": asdict(segearth.clip_settings), "inference": asdict(settings),
                           "segearth_ov": asdict(segearth), "prompts": "segearth_ov" if own else "coninfer"}


def method_label(settings: InferenceSettings, segearth=None) -> str:
    """The result's method name, the paper's row it is compared with where one exists (report.paper_method):
    "GEM", "SegEarth-OV", "MaskCLIP+SegEarth-OV", "ClearCLIP+ConInfer", ...; ``segearth`` is the
    :class:`~coninfer.segearth_ov.SegEarthOVSettings` of a SegEarth-OV-alone run."""
    if segearth is not None:
        variant = _VARIANT_ROWS.get(segearth.variant)
        name = f"{variant}+SegEarth-OV" if variant else "SegEarth-OV"
        rerun = segearth.slide_crop == 0
        if variant:  # Table 2's "+SegEarth-OV" rows are ConInfer's re-run
            return name if rerun else f"{name} (SegEarth-OV protocol)"
        return f"{name} (ConInfer re-run)" if rerun else name
    variant = _VARIANT_ROWS.get(settings.clip.variant)
    if settings.prior == "segearth-ov":  # the prior's dense CLIP is SegEarth-OV's, whatever --vlm-variant says
        return _METHOD_LABELS[settings.method] + PRIOR_SUFFIX
    if settings.method == "baseline":
        return variant or _METHOD_LABELS["baseline"]
    if settings.method == "coninfer" and variant:
        return f"{variant}+ConInfer"
    return _METHOD_LABELS[settings.method]


def protocol_settings(spec, run: RunOptions) -> InferenceSettings:
    """The paper's per-dataset settings (the official configs) with the run's overrides."""
    config = spec.coninfer
    clip_settings = _clip_settings(config.attn_lambda, run.vlm_variant, run.attn_lambda)
    return InferenceSettings(clip=clip_settings).with_values(
        method=run.method, temperature=run.temperature or config.gmm_temp, iterations=run.iterations,
        logit_scale=config.logit_scale, bg_index=config.bg_index,
        prob_thd=config.baseline_prob_thd if run.method == "baseline" else config.prob_thd,
        features=run.vfm_features, prior=run.prior)


def segearth_ov_settings(spec, run: RunOptions):
    """SegEarth-OV's settings for ``spec`` when the run is SegEarth-OV alone (``--method baseline --prior
    segearth-ov``), else None. Dataset thresholds and λ from :data:`coninfer.segearth_ov.DATASET_SETTINGS`;
    ``--vlm-variant`` swaps the dense CLIP as in Table 2 (its ignore_residual; SegEarth-OV's CLIP has no
    attention fusion)."""
    from coninfer.segearth_ov import SegEarthOVSettings

    protocol = run.segearth_protocol
    if protocol is not None and protocol not in SEGEARTH_PROTOCOLS:
        raise InputError(f"--segearth-protocol {protocol!r} is unknown", hint=f"use {' or '.join(SEGEARTH_PROTOCOLS)}")
    if run.prior != "segearth-ov":
        if protocol is not None:
            raise InputError("--segearth-protocol needs --prior segearth-ov", hint="add --prior segearth-ov")
        return None
    if run.method != "baseline":
        if protocol == "segearth-ov":
            raise InputError(f"--segearth-protocol segearth-ov runs SegEarth-OV alone, not under --method {run.method}",
                             hint="add --method baseline; under ConInfer the prior is ConInfer's re-run "
                             "(448x448, one window), pooled onto the patch grid")
        return None
    if run.vlm_variant == "gem" or run.attn_lambda is not None:
        flag = "--vlm-variant gem" if run.vlm_variant == "gem" else "--attn-lambda"
        raise InputError(f"{flag} does not apply to SegEarth-OV (--method baseline --prior segearth-ov)",
                         hint="SegEarth-OV's dense CLIP is a surgery variant without attention fusion: use "
                         "--vlm-variant segearth|maskclip|sclip|clearclip|vanilla, no --attn-lambda")
    overrides = {}
    if run.vlm_variant:
        overrides = {"variant": run.vlm_variant,
                     "ignore_residual": DenseCLIPSettings.for_variant(run.vlm_variant).ignore_residual}
    return SegEarthOVSettings.for_dataset(spec.name, SEGEARTH_PROTOCOLS[protocol or "segearth-ov"], **overrides)


def _clip_settings(dataset_lambda: float, variant: str | None, attn_lambda: float | None):
    """The dataset's SegEarth settings, or a Table-2 variant's; ``attn_lambda`` overrides either λ."""
    base = DenseCLIPSettings.for_variant(variant) if variant else DenseCLIPSettings("segearth", True, dataset_lambda)
    if attn_lambda is None:
        return base
    return dataclasses.replace(base, attn_lambda=attn_lambda)
