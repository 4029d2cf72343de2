"""SegEarth-OV, the paper's main competitor, as a prior (golden README, section H).

Per window (B, 3, Hc, Wc) of normalised pixels, zero-padded to a multiple of the patch size:

1. dense CLIP patch tokens and class row (``DenseCLIP.dense_tokens(..., output_cls_token=True)``, attn_lambda 0);
2. tokens (B, h*w, C) -> (B, C, h, w) -> SimFeatUp x16, guided by the window image;
3. per-pixel L2 normalisation, cosine logits with the unit queries;
4. ``logits[k] += λ · cos(cls, q_k)`` with λ = ``cls_token_lambda`` (-0.3: a per-window bias that removes the
   global, scene-wide part of the similarity);
5. cut back to the unpadded window.

Windows of ``slide_crop`` px every ``slide_stride`` px (the last one moved back to end at the border) are
averaged where they overlap; ``slide_crop`` 0 is one window over the whole image (ConInfer's ``predict2``
re-run, Table 2's "+SegEarth-OV"). Post-processing: bilinear resize to the output size, softmax of
``logit_scale`` x logits, max over synonyms, argmax, ``prob_thd`` -> ``bg_index``
(:mod:`coninfer.postprocess`, applied to cosine logits).

Deviations (no effect on the official settings): a ``slide_crop`` 0 window is padded to a patch multiple like
any other (the official ``predict2`` assumes 448x448 input); batches of several images are allowed (the
official code takes one; every step is per image); the queries are L2-normalised here (they already are).

Two protocols, as presets of :class:`SegEarthOVSettings`: ``segearth_ov()`` (SegEarth-OV's own: 224/112 sliding
window after a keep-ratio resize of the long side to 448) and ``coninfer_rerun()`` (no sliding, a fixed 448x448
resize). :data:`DATASET_SETTINGS` holds the per-dataset ``prob_thd``/``bg_index``/λ of both official config sets.

:func:`pool_to_grid` turns the upsampled logits into a per-patch prior that ConInfer's solver can refine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from coninfer.encoders.clip import DenseCLIP
from coninfer.encoders.simfeatup import SimFeatUp
from coninfer.errors import InputError
from coninfer.postprocess import PostprocessResult, class_probabilities, labels_from_probabilities
from coninfer.settings import VARIANTS, DenseCLIPSettings

RESIZE_MODES = ("keep_ratio", "fixed", "none")
PROTOCOLS = ("segearth_ov", "coninfer_rerun")


@dataclass(frozen=True)
class SegEarthOVSettings:
    """Every number of a SegEarth-OV prediction. Defaults = SegEarth-OV's ``configs/base_config.py``.

    ``slide_crop``/``slide_stride`` in pixels of the resized image (``slide_crop`` 0: no sliding window).
    ``resize_mode``: ``keep_ratio`` scales the long side to ``resize_size`` (mmseg ``Resize(keep_ratio=True)``),
    ``fixed`` resizes to ``resize_size`` x ``resize_size``, ``none`` keeps the image as it is.
    """

    variant: str = "segearth"
    ignore_residual: bool = True
    cls_token_lambda: float = -0.3
    logit_scale: float = 50.0
    slide_crop: int = 224
    slide_stride: int = 112
    prob_thd: float = 0.0
    bg_index: int = 0
    resize_mode: str = "keep_ratio"
    resize_size: int = 448

    def __post_init__(self) -> None:
        variant = str(self.variant).lower()
        if variant not in VARIANTS or variant == "gem":
            raise InputError(f"segearth_ov.variant: {self.variant!r} is not a dense-CLIP surgery variant",
                             hint=f"choose one of {', '.join(v for v in VARIANTS if v != 'gem')}")
        object.__setattr__(self, "variant", variant)
        for name in ("cls_token_lambda", "logit_scale", "prob_thd"):
            if not math.isfinite(float(getattr(self, name))):
                raise InputError(f"segearth_ov.{name}: {getattr(self, name)!r} is not a finite number")
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.logit_scale <= 0:
            raise InputError(f"segearth_ov.logit_scale: {self.logit_scale} must be > 0", hint="SegEarth-OV uses 50")
        if self.slide_crop < 0 or (self.slide_crop > 0 and not 0 < self.slide_stride <= self.slide_crop):
            raise InputError(f"segearth_ov.slide_stride: {self.slide_stride} must be in 1..slide_crop "
                             f"({self.slide_crop})", hint="SegEarth-OV uses crop 224, stride 112; crop 0 = no sliding")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"segearth_ov.resize_mode: {self.resize_mode!r} is unknown",
                             hint=f"choose one of {', '.join(RESIZE_MODES)}")
        if self.resize_size < 1 or self.bg_index < 0:
            raise InputError(f"segearth_ov: resize_size {self.resize_size} and bg_index {self.bg_index} must be >= 0")

    @property
    def clip_settings(self) -> DenseCLIPSettings:
        """The dense-CLIP settings of step 1 (SegEarth-OV's CLIP fork has no attention fusion: λ_attn = 0)."""
        return DenseCLIPSettings(self.variant, self.ignore_residual, 0.0)

    @classmethod
    def segearth_ov(cls, **overrides) -> SegEarthOVSettings:
        """SegEarth-OV's own protocol: keep-ratio resize to 448, 224/112 sliding window."""
        return replace(cls(), **overrides)

    @classmethod
    def coninfer_rerun(cls, **overrides) -> SegEarthOVSettings:
        """ConInfer's re-run (``configs_segov``, ``predict2``): 448x448 resize, one window, same model settings."""
        return replace(cls(slide_crop=0, slide_stride=0, resize_mode="fixed"), **overrides)

    @classmethod
    def for_dataset(cls, dataset: str, protocol: str = "segearth_ov", **overrides) -> SegEarthOVSettings:
        """The official config of ``dataset`` (a key of :data:`DATASET_SETTINGS`) under ``protocol``."""
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol: {protocol!r} is unknown", hint=f"choose one of {', '.join(PROTOCOLS)}")
        if dataset not in DATASET_SETTINGS:
            raise InputError(f"dataset: no SegEarth-OV config for {dataset!r}",
                             hint=f"known: {', '.join(DATASET_SETTINGS)}")
        prob_thd, bg_index, lam = DATASET_SETTINGS[dataset][protocol]
        base = cls.segearth_ov if protocol == "segearth_ov" else cls.coninfer_rerun
        return base(**{"prob_thd": prob_thd, "bg_index": bg_index, "cls_token_lambda": lam, **overrides})


# dataset -> {protocol: (prob_thd, bg_index, cls_token_lambda)}, from SegEarth-OV's configs/cfg_*.py and ConInfer's
# configs_segov/ (golden README, "Hyper-parameters in the official configs"); names as in data/datasets.yaml.
_SEGEARTH_OV = {
    "OpenEarthMap": (0.1, 0), "LoveDA": (0.3, 0), "iSAID": (0.4, 0), "Potsdam": (0.1, 5), "Vaihingen": (0.1, 5),
    "UAVid": (0.3, 0), "UDD5": (0.4, 4), "VDD": (0.3, 0), "WHU_Aerial": (0.6, 0), "WHU_Sat_II": (0.7, 0),
    "Inria": (0.6, 0), "xBD_pre": (0.0, 0), "CHN6-CUG": (0.8, 0), "DeepGlobe": (0.7, 0), "Massachusetts": (0.7, 0),
    "SpaceNet": (0.7, 0), "WBS-SI": (0.6, 0),
}
_CONINFER_RERUN_THD = {
    "WHU_Aerial": 0.4, "WHU_Sat_II": 0.4, "Inria": 0.3, "CHN6-CUG": 0.3, "DeepGlobe": 0.3, "Massachusetts": 0.3,
    "SpaceNet": 0.2, "WBS-SI": 0.5,
}  # the rest use SegEarth-OV's thresholds
DATASET_SETTINGS: dict[str, dict[str, tuple[float, int, float]]] = {
    name: {"segearth_ov": (thd, bg, 0.0 if name == "xBD_pre" else -0.3),
           "coninfer_rerun": (_CONINFER_RERUN_THD.get(name, thd), bg, 0.0 if name == "xBD_pre" else -0.3)}
    for name, (thd, bg) in _SEGEARTH_OV.items()
}


def keep_ratio_size(height: int, width: int, long_side: int = 448) -> tuple[int, int]:
    """mmcv's keep-ratio rescale for ``scale=(long_side, long_side)``: factor ``long_side / max(H, W)``, each side
    ``int(side * factor + 0.5)``."""
    factor = long_side / max(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resized_size(height: int, width: int, settings: SegEarthOVSettings) -> tuple[int, int]:
    """The model-input size of an (H, W) image under ``settings.resize_mode``."""
    if settings.resize_mode == "keep_ratio":
        return keep_ratio_size(height, width, settings.resize_size)
    if settings.resize_mode == "fixed":
        return settings.resize_size, settings.resize_size
    return height, width


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` over an (H, W) image, row-major: ``max(H - crop + stride - 1, 0) // stride + 1``
    rows of windows, ``y2 = min(i * stride + crop, H)``, ``y1 = max(y2 - crop, 0)`` (the last window is moved back
    to end at the border; windows are smaller than ``crop`` only when the image is); the same along x.
    ``crop`` 0: one window over the whole image."""
    if crop == 0:
        return [(0, height, 0, width)]

    def starts(size: int) -> list[tuple[int, int]]:
        count = max(size - crop + stride - 1, 0) // stride + 1
        ends = [min(index * stride + crop, size) for index in range(count)]
        return [(max(end - crop, 0), end) for end in ends]

    return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


def window_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    """Zero padding ``(left, right, top, bottom)`` to a multiple of ``patch_size``: ``(-n) mod p``, the smaller
    half before."""
    pad_h, pad_w = -height % patch_size, -width % patch_size
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


@torch.inference_mode()
def window_logits(clip: DenseCLIP, upsampler: SimFeatUp, pixels: torch.Tensor, queries: torch.Tensor,
                  settings: SegEarthOVSettings) -> torch.Tensor:
    """Cosine logits (B, K, Hc, Wc) of one window (B, 3, Hc, Wc) of normalised pixels; queries (K, C)."""
    batch, _, height, width = pixels.shape
    left, right, top, bottom = window_padding(height, width, clip.patch_size)
    padded = F.pad(pixels, (left, right, top, bottom))  # zeros in the normalised space, as the official code
    grid_h, grid_w = padded.shape[2] // clip.patch_size, padded.shape[3] // clip.patch_size
    use_cls = settings.cls_token_lambda != 0.0
    result = clip.dense_tokens(padded, settings.clip_settings, output_cls_token=use_cls)
    tokens, cls = result if use_cls else (result, None)
    grid = tokens.float().transpose(1, 2).reshape(batch, -1, grid_h, grid_w)  # (B, h*w, C) -> (B, C, h, w)
    features = upsampler(grid, padded)  # (B, C, 16h, 16w)
    if features.shape[-2:] != padded.shape[-2:]:  # an upsampler of another factor: the official bilinear resize
        features = F.interpolate(features, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    unit_queries = F.normalize(queries.to(features.device, torch.float32), dim=-1)  # (K, C)
    logits = torch.einsum("bchw,kc->bkhw", F.normalize(features, dim=1), unit_queries)
    if use_cls:
        bias = F.normalize(cls.float(), dim=-1) @ unit_queries.T  # (B, C) @ (C, K) -> (B, K)
        logits = logits + settings.cls_token_lambda * bias[:, :, None, None]
    return logits[:, :, top : top + height, left : left + width]


@torch.inference_mode()
def slide_logits(clip: DenseCLIP, upsampler: SimFeatUp, pixels: torch.Tensor, queries: torch.Tensor,
                 settings: SegEarthOVSettings) -> torch.Tensor:
    """Window-averaged logits (B, K, H, W) of normalised images (B, 3, H, W), queries (K, C)."""
    _check_inputs(pixels, queries, upsampler)
    batch, _, height, width = pixels.shape
    total = torch.zeros(batch, queries.shape[0], height, width, dtype=torch.float32, device=pixels.device)
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=pixels.device)
    for y1, y2, x1, x2 in slide_windows(height, width, settings.slide_crop, settings.slide_stride):
        logits = window_logits(clip, upsampler, pixels[:, :, y1:y2, x1:x2], queries, settings)
        total[:, :, y1:y2, x1:x2] += logits.to(total.device)
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def resize_logits(logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (half-pixel, ``align_corners=False``, no antialias) of (B, K, H, W) to (B, K, Ho, Wo)."""
    return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)


def predict(clip: DenseCLIP, upsampler: SimFeatUp, pixels: torch.Tensor, queries: torch.Tensor,
            query_to_class: Sequence[int] | torch.Tensor, settings: SegEarthOVSettings,
            out_size: tuple[int, int] | None = None) -> PostprocessResult:
    """Labels (B, Ho, Wo) int64 and class probabilities (B, C, Ho, Wo) of normalised images (B, 3, H, W).

    ``out_size`` (Ho, Wo), default (H, W): the original image size before the model-input resize.
    """
    logits = slide_logits(clip, upsampler, pixels, queries, settings)
    return postprocess_logits(logits, tuple(pixels.shape[-2:]) if out_size is None else out_size, query_to_class,
                              settings)


def postprocess_logits(logits: torch.Tensor, out_size: tuple[int, int], query_to_class: Sequence[int] | torch.Tensor,
                       settings: SegEarthOVSettings) -> PostprocessResult:
    """SegEarth-OV's post-processing of merged logits (B, K, H, W): bilinear resize to ``out_size``, softmax of
    ``logit_scale`` x logits, max over synonyms, argmax, ``prob_thd`` -> ``bg_index`` (labels (B, Ho, Wo) int64,
    probabilities (B, C, Ho, Wo))."""
    probabilities = class_probabilities(logits, out_size, query_to_class, settings.logit_scale)
    return PostprocessResult(labels_from_probabilities(probabilities, settings.prob_thd, settings.bg_index),
                             probabilities)


def segment_image(clip: DenseCLIP, upsampler: SimFeatUp, image: np.ndarray | torch.Tensor, queries: torch.Tensor,
                  query_to_class: Sequence[int] | torch.Tensor, settings: SegEarthOVSettings) -> PostprocessResult:
    """The whole protocol on one RGB image (H, W, 3) uint8: resize per ``settings``, normalise with
    ``clip.normalization``, :func:`predict`, labels (H, W) and probabilities (C, H, W) at the original size."""
    if isinstance(image, torch.Tensor):
        rgb = image
    else:  # a decoded image may be read-only; torch tensors are always writable
        array = np.asarray(image)
        rgb = torch.from_numpy(array if array.flags.writeable else array.copy())
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise InputError(f"image: expected (H, W, 3) uint8, got {tuple(rgb.shape)} {rgb.dtype}",
                         hint="pass an 8-bit RGB array")
    height, width = rgb.shape[:2]
    pixels = resize_image(rgb.permute(2, 0, 1)[None], resized_size(height, width, settings))  # (1, 3, h', w')
    mean = torch.tensor(clip.normalization.mean).reshape(1, 3, 1, 1) * 255
    std = torch.tensor(clip.normalization.std).reshape(1, 3, 1, 1) * 255
    pixels = ((pixels - mean) / std).to(clip.device)
    result = predict(clip, upsampler, pixels, queries, query_to_class, settings, out_size=(height, width))
    return PostprocessResult(result.labels[0], result.probabilities[0])


def resize_image(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, h, w) float32 holding rounded 0-255 values: bilinear, half-pixel, no
    antialias (as cv2 ``INTER_LINEAR``, which mmseg's Resize uses; cv2's fixed-point rounding may differ by 1)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255)


def pool_to_grid(logits: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The upsampled prior (B, K, H, W) as a per-patch prior (B, K, h, w) for ConInfer: the area average of the
    logits over each patch (exact block means when H, W are multiples of h, w; adaptive pooling otherwise).

    Why this pooling: a patch's VFM feature describes its whole area, so its prior should be the mean evidence
    over the same pixels. Logits, not probabilities, are averaged because ConInfer applies its own softmax at
    its own scale to cosine-valued logits; probabilities at SegEarth-OV's scale 50 are already saturated. The
    mean (unlike max pooling or sampling the patch centre) keeps the upsampler's sub-patch detail as a soft
    vote and is linear, so the window averaging and the per-window [CLS] bias pass through it unchanged.
    Flatten for :func:`coninfer.refine` with ``grid.permute(0, 2, 3, 1).reshape(-1, K)`` (row-major patches).
    """
    if logits.ndim != 4:
        raise InputError(f"logits: expected (B, K, H, W), got {tuple(logits.shape)}")
    grid_h, grid_w = (int(s) for s in grid_size)
    if not (1 <= grid_h <= logits.shape[2] and 1 <= grid_w <= logits.shape[3]):
        raise InputError(f"grid_size {tuple(grid_size)} must be between 1 and the logits' size "
                         f"{tuple(logits.shape[2:])}", hint="pass the VFM patch grid (H/p, W/p)")
    return F.adaptive_avg_pool2d(logits.float(), (grid_h, grid_w))


def _check_inputs(pixels: torch.Tensor, queries: torch.Tensor, upsampler: SimFeatUp) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise InputError(f"pixels: expected normalised float (B, 3, H, W), got {tuple(pixels.shape)} {pixels.dtype}",
                         hint="normalise the images with the CLIP's statistics")
    if queries.ndim != 2 or queries.shape[1] != upsampler.feature_dim:
        raise InputError(f"queries: expected (K, {upsampler.feature_dim}), got {tuple(queries.shape)}",
                         hint="embed the queries with the same CLIP the upsampler was trained for")
