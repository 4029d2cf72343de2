"""Pixel statistics that travel with the weights: what a model's inputs must be normalised with.

Every loaded encoder carries a :class:`Normalization` (``encoder.normalization``), set by its loader from the
preset, from a file saved next to the weights (``coninfer_vfm.json``, a timm ``config.json``'s
``pretrained_cfg``, a transformers ``preprocessor_config.json``), or from an explicit override. Nothing is
guessed from a checkpoint's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from coninfer.errors import InputError


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB mean and std on the 0-1 pixel scale: ``x = (rgb / 255 - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = "custom"

    def __post_init__(self) -> None:
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise InputError(f"Normalization.{field_name} must be 3 finite numbers, got {values!r}",
                                 hint="give one value per RGB channel on the 0-1 scale")
            object.__setattr__(self, field_name, tuple(float(v) for v in values))
        if not all(v > 0.0 for v in self.std):
            raise InputError(f"Normalization.std must be positive, got {self.std!r}", hint="use e.g. 0.229,0.224,0.225")
        if not all(-1.0 <= v <= 2.0 for v in self.mean):
            raise InputError(f"Normalization.mean {self.mean!r} is not on the 0-1 pixel scale",
                             hint="divide 0-255 statistics by 255")

    def as_dict(self) -> dict:
        """``{"name", "mean", "std"}``, the form :func:`normalization_from_mapping` reads back."""
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


# SAT-493M: DINOv3's satellite pretraining set; ImageNet: DINOv3 LVD-1689M, DINOv2 and most ViTs; OpenAI CLIP's
SAT493M = Normalization((0.430, 0.411, 0.296), (0.213, 0.156, 0.143), "sat493m")
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")
OPENAI_CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "openai_clip")

NAMED = {"sat493m": SAT493M, "sat": SAT493M, "imagenet": IMAGENET, "lvd1689m": IMAGENET, "openai_clip": OPENAI_CLIP,
         "clip": OPENAI_CLIP}


def resolve_normalization(value: Normalization | str | None, default: Normalization) -> Normalization:
    """``None`` -> ``default``; a name (``sat493m``, ``imagenet``, ``openai_clip``, ...) -> those statistics."""
    if value is None:
        return default
    if isinstance(value, Normalization):
        return value
    if isinstance(value, str) and value.lower() in NAMED:
        return NAMED[value.lower()]
    raise InputError(f"unknown normalization {value!r}",
                     hint=f"use one of {', '.join(sorted(NAMED))}, or a Normalization(mean, std)")


def normalization_from_mapping(content: Mapping, *, name: str = "custom") -> Normalization | None:
    """Statistics recorded in a json mapping, or None when it records none.

    Understands ``{"mean", "std"[, "name"]}`` (coninfer's and timm's ``pretrained_cfg``) and transformers'
    ``preprocessor_config.json`` (``image_mean``/``image_std``; ``do_normalize: false`` records none).
    """
    if not isinstance(content, Mapping):
        return None
    if "mean" in content and "std" in content:
        return Normalization(tuple(content["mean"]), tuple(content["std"]),
                             str(content.get("name") or content.get("tag") or name))
    if "image_mean" in content and "image_std" in content and content.get("do_normalize", True):
        return Normalization(tuple(content["image_mean"]), tuple(content["image_std"]), name)
    return None
