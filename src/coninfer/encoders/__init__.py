"""Encoders: what a prior (vision-language model) and a feature model must provide, and the loader registry.

Two roles, each a small protocol the rest of coninfer relies on:

* ``vlm``: a :class:`TextEncoder` that is also a :class:`DenseEncoder` (the prior: :class:`~coninfer.encoders.clip.
  DenseCLIP`), scoring patches against query embeddings;
* ``vfm``: a :class:`DenseEncoder` (the features: :class:`~coninfer.encoders.dinov3.DenseVFM`).

Loaders are registered per ``(role, format)``; a preset (``presets.py``) names its format, and
:func:`coninfer.encoders.presets.load_vlm` / ``load_vfm`` look the loader up here. A new model family or weight
format lands in one place: a function decorated with :func:`register_loader` plus a preset entry. Built-in
loaders live in ``load_clip.py``, ``load_vfm.py`` and ``tiny.py`` and are imported on the first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

from coninfer.encoders.normalization import IMAGENET, OPENAI_CLIP, SAT493M, Normalization
from coninfer.errors import ModelLoadError

Role = Literal["vlm", "vfm"]
ROLES: tuple[str, ...] = ("vlm", "vfm")


@runtime_checkable
class DenseEncoder(Protocol):
    """Per-patch features of normalised images.

    Attributes:
        name: where the weights came from (hub id, file name, ``tiny-random-*``).
        patch_size: pixels per patch side; inputs are multiples of it.
        normalization: the pixel statistics (0-1 scale) the inputs must be normalised with.
        fingerprint: a short string identifying the weights (see :mod:`coninfer.encoders.checkpoints`).
    """

    name: str
    patch_size: int
    normalization: Normalization
    fingerprint: str

    def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, h*w, D) float32 unit rows, row-major over the (H/p, W/p) grid."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Embeds class queries for a prior."""

    def encode_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """(K, E) float32 unit rows, one per query."""
        ...


Loader = Callable[..., DenseEncoder]
"""``loader(preset, *, device, dtype, **options) -> encoder``, ``preset`` a ``presets.ModelPreset``."""

LOADERS: dict[tuple[str, str], Loader] = {}
_BUILTIN_LOADER_MODULES = ("coninfer.encoders.load_clip", "coninfer.encoders.load_vfm", "coninfer.encoders.tiny")


def register_loader(role: Role, format: str) -> Callable[[Loader], Loader]:  # noqa: A002 - the preset's field
    """Decorator: ``loader`` loads presets of ``role`` whose ``format`` is ``format``."""
    if role not in ROLES:
        raise ValueError(f"register_loader: role must be one of {ROLES}, got {role!r}")

    def decorate(loader: Loader) -> Loader:
        if (role, format) in LOADERS and LOADERS[(role, format)] is not loader:
            raise ValueError(f"a {role} loader for format {format!r} is already registered")
        LOADERS[(role, format)] = loader
        return loader

    return decorate


def get_loader(role: str, format: str) -> Loader:  # noqa: A002 - the preset's field
    """The loader registered for ``(role, format)``; raises :class:`ModelLoadError` naming the known formats."""
    for module in _BUILTIN_LOADER_MODULES:
        importlib.import_module(module)  # registers the built-in loaders (cached after the first call)
    loader = LOADERS.get((role, format))
    if loader is None:
        known = ", ".join(sorted(f for r, f in LOADERS if r == role))
        raise ModelLoadError(f"no {role} loader for format {format!r}",
                             hint=f"known {role} formats: {known}; register one with register_loader")
    return loader


__all__ = ["IMAGENET", "LOADERS", "OPENAI_CLIP", "ROLES", "SAT493M", "DenseEncoder", "Normalization", "Role",
           "TextEncoder", "get_loader", "register_loader"]
