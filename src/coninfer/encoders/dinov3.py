"""Dense patch features of a vision foundation model (DINOv3 by default; DINOv2 or another ViT), via transformers.

ConInfer clusters the final-normed DINOv3 patch tokens of every tile, L2-normalised per token. :class:`DenseVFM`
wraps a transformers backbone (``DINOv3ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, or any ViT whose
``last_hidden_state`` is class token, registers, patch tokens) and exposes exactly that, together with the pixel
normalisation the weights were trained with. Checkpoint conversion from Meta's and timm's formats lives in
``load_vfm.py``; the tiny random test models in ``tiny.py``.

Token layout: ``[cls, registers x R, patches (row-major over the h x w grid)]``; R is the config's
``num_register_tokens`` (0 when absent), the patch size the config's ``patch_size``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from coninfer.encoders.normalization import IMAGENET, SAT493M, Normalization
from coninfer.errors import InputError

__all__ = ["IMAGENET", "SAT493M", "DenseVFM", "Normalization", "resolve_dtype"]

_DINOV3_TYPES = ("dinov3_vit",)


class DenseVFM(torch.nn.Module):
    """A ViT that turns normalised images into L2-normalised patch features.

    Attributes:
        model: the wrapped transformers backbone (its config gives ``patch_size``, ``hidden_size`` and
            ``num_register_tokens``).
        name: where the weights came from (hub id, file name, ``tiny-random-*``).
        patch_size: pixels per patch side (16 for DINOv3, 14 for DINOv2).
        feature_dim: channels D of a patch feature (the hidden size).
        num_prefix_tokens: class + register tokens that precede the patch tokens.
        normalization: per-channel statistics (0-1 scale) the caller must normalise with (``image_mean``,
            ``image_std``).
        fingerprint: identifies the weights (``unrecorded:<name>`` for a model built in memory).
    """

    def __init__(self, model: torch.nn.Module, *, name: str, normalization: Normalization = IMAGENET,
                 rope_periods: torch.Tensor | None = None, fingerprint: str | None = None) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        self.model_type = str(getattr(config, "model_type", type(model).__name__))
        if getattr(config, "patch_size", None) is None or getattr(config, "hidden_size", None) is None:
            raise InputError(f"DenseVFM wraps transformers ViT backbones, {self.model_type!r} has no patch_size / "
                             "hidden_size in its config", hint="load a ViT such as DINOv3ViTModel or Dinov2Model")
        self.model = model.eval()
        self.name = name
        self.patch_size = _single_int(config.patch_size, "patch_size")
        self.feature_dim = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.normalization = normalization
        self.fingerprint = fingerprint if fingerprint is not None else f"unrecorded:{name}"
        # ViTs with a fixed position table (transformers' ViT) interpolate it only when asked
        parameters = inspect.signature(model.forward).parameters
        self._forward_options = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in parameters else {}
        # A float32 copy that survives .half(): DINOv3's RoPE angles are computed in float32 like Meta's code.
        self._rope_periods: torch.Tensor | None = None
        if rope_periods is not None:
            self.set_rope_periods(rope_periods)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.normalization.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.normalization.std

    @property
    def is_dinov3(self) -> bool:
        return self.model_type in _DINOV3_TYPES

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def rope_periods(self) -> torch.Tensor | None:
        """(head_dim/4,) float32 RoPE periods in use (DINOv3 only), or None for other models."""
        if not self.is_dinov3:
            return None
        if self._rope_periods is not None:
            return self._rope_periods.clone()
        return (1.0 / self.model.rope_embeddings.inv_freq.detach().float().cpu()).clone()

    @property
    def custom_rope_periods(self) -> torch.Tensor | None:
        """The periods set by :meth:`set_rope_periods` (e.g. from a Meta checkpoint), or None when recomputed."""
        return None if self._rope_periods is None else self._rope_periods.clone()

    def set_rope_periods(self, periods: torch.Tensor) -> None:
        """Use these RoPE periods (head_dim/4,) instead of ``rope_theta ** (4j/head_dim)``.

        Meta's checkpoints store their periods (bfloat16-rounded in the released files) and Meta's code uses those;
        transformers recomputes them in float32, so a Meta checkpoint needs this override to match Meta's outputs.
        """
        if not self.is_dinov3:
            raise InputError("RoPE periods apply to DINOv3 only", hint=f"{self.model_type} has no RoPE periods to set")
        expected = tuple(self.model.rope_embeddings.inv_freq.shape)
        periods = torch.as_tensor(periods).detach().to(torch.float32).cpu().reshape(-1)
        if tuple(periods.shape) != expected:
            raise InputError(f"rope periods have shape {tuple(periods.shape)}, the model needs {expected}",
                             hint="give head_dim/4 periods")
        if not bool(torch.all(torch.isfinite(periods) & (periods > 0))):
            raise InputError(f"rope periods must be positive and finite, got {periods.tolist()}")
        self._rope_periods = periods
        self._sync_rope()

    def _sync_rope(self) -> None:
        """Keep transformers' ``inv_freq`` buffer float32 (``.half()`` casts it) and equal to the stored periods."""
        if not self.is_dinov3:
            return
        rope = self.model.rope_embeddings
        if self._rope_periods is not None:
            wanted = (1.0 / self._rope_periods).to(rope.inv_freq.device)
        elif rope.inv_freq.dtype != torch.float32:
            head_dim = rope.head_dim
            wanted = 1 / rope.base ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=rope.inv_freq.device)
        else:
            return
        if rope.inv_freq.dtype != torch.float32 or not torch.equal(rope.inv_freq, wanted):
            rope.inv_freq = wanted

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of ``height`` x ``width`` pixels; both must be multiples of the patch size."""
        if height <= 0 or width <= 0 or height % self.patch_size or width % self.patch_size:
            raise InputError(f"input size {height}x{width} is not a positive multiple of the patch size {self.patch_size}",
                             hint=f"pad or resize tiles to a multiple of {self.patch_size} pixels")
        return height // self.patch_size, width // self.patch_size

    def all_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens ``[cls, registers, patches]``: (B, 3, H, W) normalised -> (B, prefix + h*w, D)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}",
                             hint="pass a batch of normalised RGB images")
        num_patches_h, num_patches_w = self.grid_size(int(pixel_values.shape[2]), int(pixel_values.shape[3]))
        self._sync_rope()
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            tokens = self.model(pixel_values=pixel_values, **self._forward_options).last_hidden_state
        expected = self.num_prefix_tokens + num_patches_h * num_patches_w
        if tokens.shape[1] != expected:
            raise InputError(f"{self.name} returned {tokens.shape[1]} tokens, expected {expected}")
        return tokens

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens, not L2-normalised: (B, 3, H, W) -> (B, h*w, D), row-major, model dtype."""
        return self.all_tokens(pixel_values)[:, self.num_prefix_tokens :]

    def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ConInfer's DINO features: (B, 3, H, W) normalised -> (B, h*w, D) float32, unit L2 norm per token.

        Patch (row y, column x) is index ``y * w + x``. The normalisation runs in float32 so fp16 tokens with a
        large norm do not overflow.
        """
        return F.normalize(self.patch_tokens(pixel_values).float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.dense_features(pixel_values)

    def to_runtime(self, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> DenseVFM:
        """Move to ``device`` in ``dtype`` (default float32 on CPU, float16 on CUDA); returns self."""
        device = torch.device(device)
        self.to(device=device, dtype=resolve_dtype(device, dtype))
        self._sync_rope()
        return self


def resolve_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 on CPU; float16 (default) or bfloat16 (or float32) on CUDA."""
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype.lower() not in names:
            raise InputError(f"unknown dtype {dtype!r}", hint="use float32, float16 or bfloat16")
        dtype = names[dtype.lower()]
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"unsupported dtype {dtype}", hint="use float32, float16 or bfloat16")
    if device.type == "cpu" and dtype == torch.float16:  # bf16 is allowed: tile_step.resolve_dtype checks it is native
        raise InputError(f"{dtype} on the CPU is not supported (slow and inexact)",
                         hint="use float32 (or bfloat16 where the CPU has native bf16) on the CPU")
    return dtype


def _single_int(value: int | list[int] | tuple[int, ...], field_name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InputError(f"non-square {field_name} {value!r} is not supported", hint="use a square patch size")
        value = value[0]
    return int(value)
