"""Dense patch features of a vision foundation model (DINOv3, or DINOv2 as an alternative), via transformers.

ConInfer clusters the final-normed DINOv3 patch tokens of every tile, L2-normalised per token. :class:`DenseVFM`
wraps a transformers ``DINOv3ViTModel`` (or ``Dinov2Model`` / ``Dinov2WithRegistersModel``) and exposes exactly
that, together with the pixel normalisation the weights were trained with. Checkpoint conversion from Meta's and
timm's formats lives in ``load_vfm.py``.

Token layout of both model families: ``[cls, registers x R, patches (row-major over the h x w grid)]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coninfer.errors import InputError

# Pixel statistics on the 0-1 scale. SAT-493M: DINOv3's satellite pretraining set; ImageNet: LVD-1689M and DINOv2.
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINOV3_TYPES = ("dinov3_vit",)
_DINOV2_TYPES = ("dinov2", "dinov2_with_registers")


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


SAT493M = Normalization(SAT493M_MEAN, SAT493M_STD, "sat493m")
IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet")


def normalization_for(source_name: str) -> Normalization:
    """Pick the pixel statistics from a checkpoint's name: SAT-493M weights contain ``sat`` in every official name.

    Only the last component of a path or hub id counts, and only ``sat`` not inside a word (``sat493m``,
    ``vitl16sat``, ``-sat``): a model kept under ``/data/satellite/`` or ``/data/sat/`` is not a SAT-493M model.
    """
    last = source_name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    return SAT493M if re.search(r"(?<![a-z])sat(?![a-z])", last) else IMAGENET


def resolve_normalization(value: Normalization | str | None, source_name: str) -> Normalization:
    """``None`` -> chosen from the source name; ``"sat493m"``/``"sat"``/``"imagenet"`` -> those statistics."""
    if value is None:
        return normalization_for(source_name)
    if isinstance(value, Normalization):
        return value
    named = {"sat": SAT493M, "sat493m": SAT493M, "imagenet": IMAGENET, "lvd1689m": IMAGENET}
    if isinstance(value, str) and value.lower() in named:
        return named[value.lower()]
    raise InputError(f"unknown normalization {value!r}", hint="use 'sat493m', 'imagenet' or a Normalization(mean, std)")


class DenseVFM(torch.nn.Module):
    """A ViT that turns normalised images into L2-normalised patch features.

    Attributes:
        model: the wrapped transformers model (``DINOv3ViTModel``, ``Dinov2Model`` or ``Dinov2WithRegistersModel``).
        name: where the weights came from (hub id, file name, ``tiny-random-*``).
        patch_size: pixels per patch side (16 for DINOv3, 14 for DINOv2).
        feature_dim: channels D of a patch feature (the hidden size).
        num_prefix_tokens: class + register tokens that precede the patch tokens.
        image_mean, image_std: per-channel statistics (0-1 scale) the caller must normalise with.
    """

    def __init__(self, model: torch.nn.Module, *, name: str, normalization: Normalization = IMAGENET,
                 rope_periods: torch.Tensor | None = None) -> None:
        super().__init__()
        config = model.config
        self.model_type = str(config.model_type)
        if self.model_type not in _DINOV3_TYPES + _DINOV2_TYPES:
            raise InputError(f"DenseVFM wraps DINOv3/DINOv2 models, got model_type {self.model_type!r}",
                             hint="load a DINOv3ViTModel, Dinov2Model or Dinov2WithRegistersModel")
        self.model = model.eval()
        self.name = name
        self.patch_size = _single_int(config.patch_size, "patch_size")
        self.feature_dim = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.normalization = normalization
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
        """(head_dim/4,) float32 RoPE periods in use (DINOv3 only), or None for DINOv2."""
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
            raise InputError("RoPE periods apply to DINOv3 only", hint="DINOv2 uses learned position embeddings")
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
            tokens = self.model(pixel_values=pixel_values).last_hidden_state
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
    if device.type == "cpu" and dtype != torch.float32:
        raise InputError(f"{dtype} on the CPU is not supported (slow and inexact)", hint="use float32 on the CPU")
    return dtype


def build_tiny_dinov3(seed: int = 0, *, num_hidden_layers: int = 2, gated_mlp: bool = False) -> DenseVFM:
    """A seeded random tiny DINOv3 (hidden 64, 4 heads, patch 16, 4 registers) for offline smoke tests.

    Its features are meaningless: use it to exercise shapes and plumbing only, never to judge segmentation quality.
    """
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if not 2 <= num_hidden_layers <= 4:
        raise InputError(f"num_hidden_layers must be 2..4 for the tiny model, got {num_hidden_layers}")
    config = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=4, patch_size=16, num_register_tokens=4, use_gated_mlp=gated_mlp,
                             hidden_act="silu" if gated_mlp else "gelu", image_size=224)
    model = DINOv3ViTModel(config)
    randomize_(model, seed)
    return DenseVFM(model, name=f"tiny-random-dinov3-seed{seed}", normalization=IMAGENET)


def build_tiny_dinov2(seed: int = 0, *, num_register_tokens: int = 0) -> DenseVFM:
    """A seeded random tiny DINOv2 (hidden 64, 2 layers, 4 heads, patch 14); meaningless features, for tests."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56)
    if num_register_tokens:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    randomize_(model, seed)
    return DenseVFM(model, name=f"tiny-random-dinov2-seed{seed}", normalization=IMAGENET)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a seeded generator, independent of transformers' init (which may change).

    Norm weights ~ N(1, 0.1^2), layer scales ~ U(0.3, 1), other vectors ~ N(0, 0.05^2), matrices ~ N(0, 1/fan_in),
    tokens ~ N(0, 0.5^2): every block then changes the tokens noticeably, so conversion mistakes show.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            shape = parameter.shape
            if "norm" in name and name.endswith("weight"):
                values = 1 + 0.1 * torch.randn(shape, generator=generator)
            elif "lambda1" in name or "layer_scale" in name:
                values = 0.3 + 0.7 * torch.rand(shape, generator=generator)
            elif "token" in name or "position_embeddings" in name:
                values = 0.5 * torch.randn(shape, generator=generator)
            elif parameter.ndim == 1:
                values = 0.05 * torch.randn(shape, generator=generator)
            else:
                fan_in = math.prod(shape[1:])
                values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
            parameter.copy_(values.to(parameter.dtype))


def _single_int(value: int | list[int] | tuple[int, ...], field_name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InputError(f"non-square {field_name} {value!r} is not supported", hint="use a square patch size")
        value = value[0]
    return int(value)
