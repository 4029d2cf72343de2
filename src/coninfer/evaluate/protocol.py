"""The paper's evaluation protocol: per-dataset settings from the official configs, the encoders shared
between datasets, and one fingerprint of everything that changes a result (so a rerun resumes)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coninfer.errors import InputError
from coninfer.settings import DenseCLIPSettings, InferenceSettings

_METHOD_LABELS = {"coninfer": "ConInfer", "decoupled": "ConInfer (decoupled)", "baseline": "baseline"}
"""The results' method names (the report compares "baseline" with the paper's MaskCLIP* row)."""


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
    temperature: float | None = None
    iterations: int | None = None
    prior: str = "clip"
    upsampler: str | None = None


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
    from coninfer.tile_step import Models, infer_tiles

    settings = protocol_settings(spec, run)
    clip_settings, config = settings.clip, spec.coninfer
    vfm_source = (run.vfm or spec.coninfer.vfm_preset) if settings.needs_vfm else None
    classes = ClassList.from_names(list(spec.class_lines))
    models: list[Models] = []  # built on the first batch

    def predict_batch(images):
        if not models:
            clip, vfm_model = encoders.get(run.vlm, vfm_source)
            upsampler = None
            if settings.prior == "segearth-ov":
                from coninfer.encoders.simfeatup import load_simfeatup

                if not run.upsampler:
                    raise InputError("--prior segearth-ov needs --upsampler", hint="pass the SimFeatUp weights (.ckpt)")
                upsampler = load_simfeatup(run.upsampler, device=encoders.device)
            # the reference code feeds every DINOv3 the SAT-493M statistics, also the LVD ViT-H+ (UAVid, VDD)
            models.append(Models(clip, vfm_model, classes, clip.encode_queries(list(classes.queries)),
                                 encoders.device, encoders.dtype,
                                 vfm_normalization=(config.vfm_normalization.mean, config.vfm_normalization.std)
                                 if vfm_model else None, upsampler=upsampler))
        return [result.labels for result in infer_tiles(models[0], images, settings)]

    run_settings = {"vlm": run.vlm, "vfm": vfm_source, "upsampler": run.upsampler, "clip": asdict(clip_settings),
                    "inference": asdict(settings),
                    "precision": str(encoders.dtype).removeprefix("torch.")}
    # the image list too: a rerun after more data was converted starts its own state instead of failing on the old
    names = [sample.name for sample in list_samples(spec, data_root)[: run.limit]]
    identity = {**run_settings, "context_size": run.context_size, "limit": run.limit,
                "data_root": str(data_root.resolve()), "images": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    state_path = run.state_root / f"{spec.name}-{run.method}-{digest}.json"
    return evaluate_dataset(spec, data_root, predict_batch, context_size=run.context_size, limit=run.limit,
                            state_path=state_path, progress=run.progress,
                            method=method_label(settings), settings=run_settings)


def method_label(settings: InferenceSettings) -> str:
    """The result's method name; the prior alone with GEM or SegEarth-OV is compared with that paper row."""
    if settings.method == "baseline" and settings.clip.variant == "gem":
        return "GEM"
    if settings.method == "baseline" and settings.prior == "segearth-ov":
        return "SegEarth-OV"
    label = _METHOD_LABELS[settings.method]
    return f"{label} + SegEarth-OV prior" if settings.prior == "segearth-ov" else label


def protocol_settings(spec, run: RunOptions) -> InferenceSettings:
    """The paper's per-dataset settings (the official configs) with the run's overrides."""
    config = spec.coninfer
    clip_settings = _clip_settings(config.attn_lambda, run.vlm_variant, run.attn_lambda)
    return InferenceSettings(clip=clip_settings).with_values(
        method=run.method, temperature=run.temperature or config.gmm_temp, iterations=run.iterations,
        logit_scale=config.logit_scale, bg_index=config.bg_index,
        prob_thd=config.baseline_prob_thd if run.method == "baseline" else config.prob_thd,
        features=run.vfm_features, prior=run.prior)


def _clip_settings(dataset_lambda: float, variant: str | None, attn_lambda: float | None):
    """The dataset's SegEarth settings, or a Table-2 variant's; ``attn_lambda`` overrides either λ."""
    base = DenseCLIPSettings.for_variant(variant) if variant else DenseCLIPSettings("segearth", True, dataset_lambda)
    if attn_lambda is None:
        return base
    return dataclasses.replace(base, attn_lambda=attn_lambda)
