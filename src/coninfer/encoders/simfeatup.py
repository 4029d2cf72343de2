"""SimFeatUp: the joint-bilateral (JBU) feature upsampler SegEarth-OV puts after its dense CLIP (golden README, H).

A low-resolution feature map S (B, C, h, w) is upsampled x16 in four x2 stages, each guided by the image
average-pooled to the stage's output size. One stage ``JBU(S, G)``, G (B, 3, H', W') = (2h, 2w), radius r,
d = 2r + 1 taps per side:

1. range features ``R = conv(GELU(conv(G)))`` (key_dim channels, exact GELU);
2. range kernel ``Kr[p] = softmax_p(τ · <R_shifted_p, R>)`` over the d*d taps of a reflect-padded window,
   ``τ = clamp(exp(range_temp), 1e-4, 1e4)``;
3. spatial kernel ``Ks[p] = exp(-(l_i² + l_j²) / 2σ²)``, ``l = linspace(-1, 1, d)``, σ = ``sigma_spatial``;
4. ``K = Kr Ks / max(Σ_p Kr Ks, 1e-7)``, then ``K += 0.1 · conv(GELU(conv([K, G])))`` (no re-normalisation);
5. ``out[c] = Σ_p K[p] · reflect_pad(bicubic(S -> H' x W'))[c, shifted by p]`` (the adaptive convolution).

After the fourth stage ``out = S + 0.1 · conv1x1(S)``. Two layouts exist: ``jbu_one`` (one module ``up``
shared by the four stages, r = 5; what SegEarth-OV's configs use) and ``jbu_stack`` (four modules
``up1..up4``, r = 3; the released ``*_jbu_stack_cocostuff.ckpt`` files). Both are :class:`SimFeatUp`; the layout,
radius, key size and feature size are read from the tensors by :func:`load_simfeatup`.

Taps are evaluated as d*d shifted sums rather than with ``unfold``: unfold would hold a (key_dim·d², H'W')
tensor, 3 GB at the 448² last stage, where the shifted sums never hold more than one (C, H', W') product.
Dropout layers of the original are inference no-ops and are kept as ``nn.Identity`` placeholders, only so
that state-dict indices (``range_proj.0``/``.3``, ``fixup_proj.1``) match the checkpoints.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

from coninfer.encoders.checkpoints import (
    StateDict,
    hub_download,
    load_into,
    load_state_dict,
    weights_fingerprint,
)
from coninfer.errors import CheckpointFormatError, InputError, InputFileError, ModelLoadError

logger = logging.getLogger(__name__)

KEY_PREFIX = "upsampler."  # every key of the released Lightning checkpoints starts with it
NUM_STAGES = 4  # four x2 stages: x16, one ViT-B/16 patch back to one pixel
FIXUP_WEIGHT = 0.1  # both residual fix-ups are scaled by 0.1 in the original
LAYOUTS = ("jbu_one", "jbu_stack")
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")


class JBUStage(nn.Module):
    """One learned-range joint bilateral x2 upsampling: (B, C, h, w) features, (B, g, 2h, 2w) guidance.

    ``radius`` r gives (2r + 1)² taps; ``key_dim`` is the size of the range features.
    """

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 5) -> None:
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.range_proj = nn.Sequential(nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Identity(),
                                        nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(nn.Conv2d(taps + guidance_dim, taps, 1), nn.GELU(), nn.Identity(),
                                        nn.Conv2d(taps, taps, 1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) and guidance (B, g, H', W') -> (B, C, H', W')."""
        out_h, out_w = guidance.shape[-2:]
        kernel = self.kernel(guidance)  # (B, d*d, H', W')
        upsampled = F.interpolate(source, size=(out_h, out_w), mode="bicubic", align_corners=False)
        padded = F.pad(upsampled, [self.radius] * 4, mode="reflect")
        output = torch.zeros_like(upsampled)
        for tap, (row, col) in enumerate(self._offsets()):
            output.addcmul_(kernel[:, tap : tap + 1], padded[:, :, row : row + out_h, col : col + out_w])
        return output

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """Per-pixel tap weights (B, d*d, H', W') from guidance (B, g, H', W'); tap p = i*d + j, offset (i-r, j-r)."""
        out_h, out_w = guidance.shape[-2:]
        keys = self.range_proj(guidance)  # (B, key_dim, H', W')
        padded = F.pad(keys, [self.radius] * 4, mode="reflect")
        similarity = torch.stack([(padded[:, :, row : row + out_h, col : col + out_w] * keys).sum(1)
                                  for row, col in self._offsets()], dim=1)  # d*d x (B, H', W') -> (B, d*d, H', W')
        temperature = self.range_temp.exp().clamp(1e-4, 1e4)
        kernel = torch.softmax(temperature * similarity, dim=1) * self._spatial_kernel(guidance)
        kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-7)
        return kernel + FIXUP_WEIGHT * self.fixup_proj(torch.cat([kernel, guidance], dim=1))

    def _spatial_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """Gaussian over the tap offsets, (1, d*d, 1, 1), offsets on linspace(-1, 1, d)."""
        steps = torch.linspace(-1.0, 1.0, self.diameter, device=like.device, dtype=like.dtype)
        rows, cols = torch.meshgrid(steps, steps, indexing="ij")
        squared = (rows ** 2 + cols ** 2).reshape(1, -1, 1, 1)  # (d, d) -> (1, d*d, 1, 1), tap p = i*d + j
        return torch.exp(-squared / (2 * self.sigma_spatial.to(like.dtype) ** 2))

    def _offsets(self) -> list[tuple[int, int]]:
        return [(row, col) for row in range(self.diameter) for col in range(self.diameter)]


class SimFeatUp(nn.Module):
    """SimFeatUp x16 upsampler of (B, C, h, w) features guided by the (B, 3, 16h, 16w) image.

    ``layout`` ``jbu_one``: one :class:`JBUStage` ``up`` applied four times; ``jbu_stack``: ``up1..up4``.
    The guidance is the same normalised image the feature encoder saw.
    """

    def __init__(self, feature_dim: int, *, layout: str = "jbu_one", radius: int | None = None,
                 key_dim: int = 32, guidance_dim: int = 3) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise InputError(f"layout: unknown SimFeatUp layout {layout!r}", hint=f"choose one of {', '.join(LAYOUTS)}")
        if radius is None:
            radius = 5 if layout == "jbu_one" else 3  # the radii of the released weights
        self.layout = layout
        self.feature_dim = feature_dim
        self.name = f"simfeatup-{layout}"
        self.fingerprint = f"unrecorded:{self.name}"
        if layout == "jbu_one":
            self.up = JBUStage(guidance_dim, key_dim, radius)
        else:
            for stage in range(1, NUM_STAGES + 1):
                self.add_module(f"up{stage}", JBUStage(guidance_dim, key_dim, radius))
        self.fixup_proj = nn.Sequential(nn.Identity(), nn.Conv2d(feature_dim, feature_dim, 1))

    @property
    def scale(self) -> int:
        return 2 ** NUM_STAGES

    def stages(self) -> list[JBUStage]:
        """The module of each of the four stages, in order (the same one four times for ``jbu_one``)."""
        if self.layout == "jbu_one":
            return [self.up] * NUM_STAGES
        return [getattr(self, f"up{stage}") for stage in range(1, NUM_STAGES + 1)]

    def forward(self, features: torch.Tensor, image: torch.Tensor, *, keep_stages: bool = False):
        """(B, C, h, w) features, (B, 3, 16h, 16w) image -> (B, C, 16h, 16w); with ``keep_stages`` also the list
        of the four stage outputs (B, C, 2^s h, 2^s w) before the final fix-up."""
        outputs = self.upsample_stages(features, image)
        source = outputs[-1]
        result = source + FIXUP_WEIGHT * self.fixup_proj(source)
        return (result, outputs) if keep_stages else result

    def upsample_stages(self, features: torch.Tensor, image: torch.Tensor, count: int = NUM_STAGES) -> list:
        """The outputs (B, C, 2^s h, 2^s w) of the first ``count`` x2 stages, s = 1..count (no final fix-up)."""
        if features.ndim != 4 or features.shape[1] != self.feature_dim:
            raise InputError(f"features: expected (B, {self.feature_dim}, h, w), got {tuple(features.shape)}",
                             hint="reshape the patch tokens to a (B, C, h, w) grid")
        if image.ndim != 4 or image.shape[0] != features.shape[0]:
            raise InputError(f"image: expected ({features.shape[0]}, 3, H, W), got {tuple(image.shape)}")
        smallest = max(stage.radius for stage in self.stages()) // 2 + 1  # reflect padding needs 2h > radius
        if min(features.shape[-2:]) < smallest:
            raise InputError(f"features: a {tuple(features.shape[-2:])} grid is too small for the radius-"
                             f"{self.stages()[0].radius} JBU, which needs at least {smallest} patches per side",
                             hint=f"use windows of at least {smallest * self.scale} pixels")
        source = features.float()
        image = image.to(device=source.device, dtype=source.dtype)
        outputs = []
        for stage in self.stages()[:count]:
            height, width = source.shape[-2:]
            # the guidance at the stage's output size: block means of the image when the ratio is an integer
            guidance = F.adaptive_avg_pool2d(image, (2 * height, 2 * width))
            source = stage(source, guidance)
            outputs.append(source)
        return outputs


def load_simfeatup(source: str | Path, *, device: str | torch.device = "cpu",
                   revision: str | None = None) -> SimFeatUp:
    """Load SimFeatUp weights: an ``upsampler`` preset name (``coninfer models list``: ``simfeatup-clip-b16``,
    ``tiny-random``), a local ``.ckpt``/``.pth``/``.pt`` (PyTorch Lightning checkpoint, read with
    ``torch.load(weights_only=True)``), a ``.safetensors`` file, or a hub file ``owner/repo/path/file.ckpt``.

    The ``state_dict`` wrapper and the ``upsampler.`` key prefix are removed; layout (``jbu_one``/``jbu_stack``),
    radius, key and feature sizes are read from the tensors; the load is strict. Returns the model in eval mode.

    Raises:
        InputFileError: a local path that does not exist.
        CheckpointFormatError: unreadable file, or tensors that are not a SimFeatUp (missing/unexpected keys named).
    """
    text = str(source)
    preset = _upsampler_preset(text) if not Path(text).expanduser().exists() else None
    if preset is not None and preset.builtin:
        return build_tiny_simfeatup(seed=TINY_SEED).to(device).eval()
    if preset is not None:
        try:
            path, repo_id = hub_download(preset.source, preset.filename, revision=revision), preset.source
        except ModelLoadError as error:
            raise ModelLoadError(f"--upsampler {text}: {error.args[0]}",
                                 hint=f"{error.hint}; or download {preset.filename} from "
                                 f"github.com/{preset.source} and pass its path") from error
    else:
        path, repo_id = _checkpoint_file(text, revision)
    state_dict = strip_prefix(load_state_dict(path))
    model = build_from_state_dict(state_dict, source=text)
    model.name = text
    model.fingerprint = weights_fingerprint(path, repo_id=repo_id)
    return model.to(device).eval()


def _checkpoint_file(text: str, revision: str | None) -> tuple[Path, str | None]:
    """(local file, hub repository or None) of a path or a hub file ``owner/repo/path/file.ckpt``."""
    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    looks_hub = text.count("/") >= 2 and text.endswith(CHECKPOINT_SUFFIXES) and not text.startswith((".", "/", "~"))
    if not looks_hub or path.exists():
        from coninfer.encoders.presets import UPSAMPLER, preset_names

        raise InputFileError(f"--upsampler {text!r}: not found (neither a preset nor a SimFeatUp file)",
                             hint=f"pass a preset ({', '.join(preset_names(UPSAMPLER))}), a .ckpt/.pth/"
                             ".safetensors file or a hub file owner/repo/file.ckpt")
    repo_id, filename = "/".join(text.split("/")[:2]), "/".join(text.split("/")[2:])
    return hub_download(repo_id, filename, revision=revision), repo_id


TINY_SEED = 0  # the seed of the tiny-random upsampler preset
TINY_FEATURE_DIM = 32  # the projection size of the tiny-random CLIP (encoders/tiny.py), whose tokens it upsamples


def build_tiny_simfeatup(feature_dim: int = TINY_FEATURE_DIM, seed: int = TINY_SEED) -> SimFeatUp:
    """A seeded random ``jbu_one`` SimFeatUp for offline smoke tests (meaningless output).

    Convolutions ~ N(0, 1/fan_in) with N(0, 0.05^2) biases, so the fix-ups change the kernels visibly but stay
    small; ``range_temp`` 0 (τ = 1) and ``sigma_spatial`` 1, inside the range of the released weights.
    """
    model = SimFeatUp(feature_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 4:
                values = torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[1])
            elif parameter.ndim == 1:
                values = 0.05 * torch.randn(parameter.shape, generator=generator)
            else:  # the two learned scalars keep their initial values
                continue
            parameter.copy_(values)
    model.name = f"tiny-random-simfeatup-seed{seed}"
    model.fingerprint = f"tiny-random:{seed}"
    return model.eval()


def _upsampler_preset(name: str):
    """The ``upsampler`` preset called ``name``, or None when it is not one (then it is a path or hub file)."""
    from coninfer.encoders.presets import PRESETS, UPSAMPLER

    return PRESETS.get((UPSAMPLER, name))


def strip_prefix(state_dict: StateDict, prefix: str = KEY_PREFIX) -> StateDict:
    """Remove ``prefix`` from every key when all keys carry it (the released checkpoints' ``upsampler.``).

    Unlike the official loader, which cuts 10 characters from every key unconditionally, keys without the
    prefix are kept as they are, so a state dict saved from :class:`SimFeatUp` itself loads too.
    """
    if state_dict and all(name.startswith(prefix) for name in state_dict):
        return {name[len(prefix):]: tensor for name, tensor in state_dict.items()}
    return dict(state_dict)


def build_from_state_dict(state_dict: StateDict, *, source: str = "state dict") -> SimFeatUp:
    """A :class:`SimFeatUp` with the layout and sizes of ``state_dict`` (prefix already stripped), loaded strictly."""
    layout = "jbu_stack" if any(name.startswith("up1.") for name in state_dict) else "jbu_one"
    stage = "up." if layout == "jbu_one" else "up1."
    needed = (f"{stage}fixup_proj.0.weight", f"{stage}range_proj.0.weight", "fixup_proj.1.weight")
    absent = [name for name in needed if name not in state_dict]
    if absent:
        example = next(iter(state_dict), "none")
        raise CheckpointFormatError(
            f"{source}: not a SimFeatUp jbu_one/jbu_stack checkpoint, missing {absent[0]!r} (keys look like "
            f"{example!r})", hint="pass a SimFeatUp .ckpt whose state_dict keys start with 'upsampler.up'")
    taps = state_dict[f"{stage}fixup_proj.0.weight"].shape[0]
    radius = (math.isqrt(taps) - 1) // 2
    if (2 * radius + 1) ** 2 != taps:
        raise CheckpointFormatError(f"{source}: {taps} kernel taps is not an odd square",
                                    hint="the checkpoint is not a SimFeatUp JBU")
    key_dim, guidance_dim = state_dict[f"{stage}range_proj.0.weight"].shape[:2]
    model = SimFeatUp(int(state_dict["fixup_proj.1.weight"].shape[0]), layout=layout, radius=radius,
                      key_dim=int(key_dim), guidance_dim=int(guidance_dim))
    load_into(model, {name: tensor.float() for name, tensor in state_dict.items()}, source=source)
    logger.info("SimFeatUp %s from %s: C=%d, radius %d", layout, source, model.feature_dim, radius)
    return model.eval()
