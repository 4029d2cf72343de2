"""The tile step: RGB tiles -> CLIP prior + VFM features on one patch grid -> solver -> per-tile label maps.

This is the paper's evaluation path (:func:`infer_tiles`: the context is the batch of tiles given). Whole
scenes, with scene-level context, an on-disk store and stitching, are in :mod:`coninfer.pipeline` (the
passes) and :mod:`coninfer.segmenter` (the facade).

Patch grid: the VFM sees tiles at ``model_res`` (448), so its grid is ``G = model_res / vfm.patch_size``
(28 for DINOv3 /16). CLIP sees the same tiles at ``G * clip.patch_size`` so both grids are G x G: 448 for a
/16 CLIP, 896 for a /32 CLIP (RemoteCLIP B/32), 392 and 32x32... for other pairs. Patch ``(y, x)`` of tile ``b``
has the flat index ``b * G * G + y * G + x`` everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from coninfer.errors import CompileError, InputError
from coninfer.postprocess import (
    Workspace,
    class_probabilities,
    labels_from_probabilities,
    patches_to_grid,
)
from coninfer.prompts import ClassList
from coninfer.settings import InferenceSettings
from coninfer.solver import prior_probabilities, refine

logger = logging.getLogger(__name__)



@dataclass
class Models:
    """Loaded encoders and the class queries they score, on one device and dtype.

    ``query_embeddings`` (K, E) are L2-normalised text embeddings of ``classes.queries``. ``clip_normalization``
    / ``vfm_normalization`` are (mean, std) on the 0-1 scale, taken from the models unless given.
    """

    clip: torch.nn.Module
    vfm: torch.nn.Module | None
    classes: ClassList
    query_embeddings: torch.Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    clip_normalization: tuple[Sequence[float], Sequence[float]] | None = None
    vfm_normalization: tuple[Sequence[float], Sequence[float]] | None = None
    upsampler: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        num_queries = len(self.classes.queries)
        if self.query_embeddings.ndim != 2 or self.query_embeddings.shape[0] != num_queries:
            raise InputError(
                f"query_embeddings must be (K={num_queries}, E), got {tuple(self.query_embeddings.shape)}"
            )
        if self.clip_normalization is None:
            self.clip_normalization = (self.clip.image_mean, self.clip.image_std)
        if self.vfm is not None and self.vfm_normalization is None:
            self.vfm_normalization = (self.vfm.image_mean, self.vfm.image_std)

    def grid_size(self, model_res: int) -> int:
        """Patch-grid side G for tiles resized to ``model_res`` (the VFM's grid; CLIP is sized to match)."""
        patch = self.vfm.patch_size if self.vfm is not None else self.clip.patch_size
        if model_res % patch:
            raise InputError(
                f"model resolution {model_res} is not a multiple of the VFM patch size {patch}",
                hint=f"use a multiple of {patch}, e.g. {patch * max(1, round(model_res / patch))}",
            )
        return model_res // patch


def load_models(classes: ClassList, *, vlm: str = "clip-b16", vfm: str | None = "dinov3-l16-sat",
                device: str = "auto", precision: str = "auto", clip_settings=None, upsampler: str | None = None,
                vfm_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                cache_dir=None, compile_models: bool = False) -> Models:
    """Load the CLIP (``vlm``) and VFM (``vfm``; None when the method needs none) presets/paths and embed the
    class queries (prompt ensemble, cached on disk). ``compile_models``: :func:`compile_encoder` both
    (``--compile``)."""
    from coninfer.encoders import presets
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    if compile_models:
        check_compile_available(torch_device)  # before any weights are loaded
    clip = presets.load_vlm(vlm, device=torch_device, dtype=dtype, settings=clip_settings)
    vfm_model = presets.load_vfm(vfm, device=torch_device, dtype=dtype) if vfm else None
    if compile_models:
        for encoder in (clip, vfm_model):
            if encoder is not None:
                compile_encoder(encoder)
    queries = clip.encode_queries(list(classes.queries), cache_dir=cache_dir)
    upsampler_model = None
    if upsampler:
        from coninfer.encoders.simfeatup import load_simfeatup

        upsampler_model = load_simfeatup(upsampler, device=torch_device)
    return Models(clip, vfm_model, classes, queries, torch_device, dtype, vfm_normalization=vfm_normalization,
                  upsampler=upsampler_model)


_COMPILE_HINT = "run without --compile (eager, the default, gives the same labels)"


def check_compile_available(device: torch.device) -> None:
    """Fail before any work where torch.compile cannot run on the CPU: no C++ compiler for inductor's kernels,
    which torch itself would only report at the first batch. (On a GPU inductor writes Triton kernels, whose
    failures surface at the first batch: :func:`compile_encoder`.)"""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # private API: without it the first batch reports a missing compiler (compile_encoder)
        return
    try:
        get_cpp_compiler()
    except RuntimeError as error:
        raise CompileError(f"--compile on the CPU needs a C++ compiler for torch.compile: {error}",
                           hint=_COMPILE_HINT + ", or install g++ (or set CXX)") from error


def compile_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """torch.compile ``encoder``'s dense forward in place (``--compile``); returns it. Weights and their names
    are untouched, so fingerprints and resume keys do not change.

    Shapes follow torch's automatic dynamic rule (``dynamic=None``): the first batch compiles for its shape, the
    first batch of another size compiles once more for any size (a batch of one has its own), so `eval all`, whose
    datasets end in last batches of many sizes, compiles at most three times, where static shapes would compile
    once per size and fall back to eager past dynamo's recompile limit (8). A DINOv3/DINOv2 (:class:`~coninfer.encoders.dinov3.DenseVFM`) compiles its
    backbone: its dense_features opens an inference_mode block, which dynamo cannot trace ("Cannot set
    version_counter for inference tensor", torch 2.13). A dense CLIP compiles ``dense_features`` (its surgery
    loop; the other entry points, text and SegEarth-OV windows, stay eager). torch compiles at the first call: a
    failure then is a :class:`~coninfer.errors.CompileError` naming ``--compile``, never a silent eager run.
    """
    from coninfer.encoders.dinov3 import DenseVFM

    if getattr(encoder, "_coninfer_compiled", False):
        return encoder
    try:
        if isinstance(encoder, DenseVFM):
            encoder.model.compile(dynamic=None)
            forward = encoder.dense_features
        else:
            forward = torch.compile(encoder.dense_features, dynamic=None)
    except RuntimeError as error:  # e.g. a Python version torch.compile does not support yet
        raise CompileError(f"torch.compile is unavailable here: {_first_line(error)}", hint=_COMPILE_HINT) from error
    encoder.dense_features = _compile_errors_named(forward, getattr(encoder, "name", type(encoder).__name__))
    encoder._coninfer_compiled = True
    return encoder


def _compile_errors_named(forward, name: str):
    """``forward`` with torch.compile's failures (raised at a call that compiles) as one CompileError line."""
    from torch._dynamo.exc import TorchDynamoException

    def compiled_forward(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except TorchDynamoException as error:
            raise CompileError(f"torch.compile failed on {name}: {_first_line(error)}", hint=_COMPILE_HINT) from error

    return compiled_forward


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("backend=")] or lines or [type(error).__name__]
    return useful[0]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. An unavailable CUDA device is an error with a hint."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported", hint="use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available", hint="use --device cpu")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA (the paper runs fp16); on the CPU bfloat16 where it multiplies bf16 natively
    (:func:`coninfer._cpu.native_bf16`; README "Speed": DINOv3-L 5x faster, labels not identical), else float32. ``fp32`` is
    the exact-parity mode everywhere; fp16 is CUDA only, bf16 on the CPU needs native support."""
    from coninfer._cpu import ENV_OVERRIDE, bf16_features, native_bf16

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if native_bf16():
            logger.info("--precision auto: bf16 on this CPU (%s); --precision fp32 for exact parity",
                        ", ".join(bf16_features()) or f"{ENV_OVERRIDE}=1")
            return torch.bfloat16
        return torch.float32
    if precision not in table:
        raise InputError(f"unknown precision {precision!r}", hint="use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and precision == "fp16":
        raise InputError("fp16 is not supported on the CPU", hint="use --precision fp32 (or auto) on the CPU")
    if device.type == "cpu" and precision == "bf16" and not native_bf16():
        # emulated bf16 (oneDNN on plain AVX-512/AVX2) is slower than fp32 and less exact: never worth it
        raise InputError("--precision bf16 is not supported on the CPU without native bf16 matmul "
                         "(AVX512-BF16 or AMX-BF16); this one has none", hint="use --precision fp32 (or auto) on this CPU")
    return table[precision]


def as_tile_batch(images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Tiles as a list of (3, H, W) uint8 tensors; accepts (B, H, W, 3) / (B, 3, H, W) arrays or a list of
    (H, W, 3) / (3, H, W) arrays (sizes may differ between tiles)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    tiles = []
    for index, image in enumerate(images):
        tensor = image if isinstance(image, torch.Tensor) else _shared_tensor(np.asarray(image))
        if tensor.ndim != 3 or 3 not in (tensor.shape[0], tensor.shape[-1]):
            raise InputError(f"tile {index} has shape {tuple(tensor.shape)}; expected (H, W, 3) or (3, H, W) RGB")
        if tensor.shape[0] != 3:  # from (H, W, 3) -> (3, H, W)
            tensor = tensor.permute(2, 0, 1)
        if tensor.dtype != torch.uint8:
            raise InputError(f"tile {index} has dtype {tensor.dtype}; expected uint8 RGB")
        tiles.append(tensor)
    if not tiles:
        raise InputError("no tiles given")
    return tiles


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory; a read-only array (a decoded image, a memory map) is copied first,
    since torch tensors are always writable."""
    return torch.as_tensor(array if array.flags.writeable else array.copy())


def to_model_input(tiles: Sequence[torch.Tensor], size: int, normalization, device, dtype) -> torch.Tensor:
    """Resize uint8 tiles (3, H, W) to (size, size) (bilinear, antialiased, half-pixel centres) and normalise.

    Normalisation is done on the 0-255 scale, ``(x - 255 * mean) / (255 * std)``, so that integer statistics
    such as (128, 64) are exact. Returns (B, 3, size, size) in ``dtype`` on ``device``.
    """
    mean, std = (torch.tensor(v, dtype=torch.float64).mul(255).float().view(1, 3, 1, 1).to(device)
                 for v in normalization)
    # tiles of one size (the usual case) are resized as one batch; each is resized on its own otherwise
    groups = [list(tiles)] if len({tuple(t.shape) for t in tiles}) == 1 else [[tile] for tile in tiles]
    batch = []
    for group in groups:
        pixels = stack_on_device(group, torch.device(device)).float()  # (b, 3, H, W)
        if tuple(pixels.shape[2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp(0, 255)
        # in place on the fresh float copy: the same two roundings as (pixels - mean) / std, no temporaries
        batch.append(pixels.sub_(mean).div_(std))
    return (batch[0] if len(batch) == 1 else torch.cat(batch)).to(dtype)


def stack_on_device(tiles: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(b, 3, H, W) uint8 of same-size tiles on ``device``; the caller converts to float there.

    To a GPU the tiles go as uint8 (a quarter of float32's bytes: torch converts a dtype-changing host-to-GPU
    copy on the CPU first) through pinned memory, without blocking the host (torch's pinned-memory cache keeps
    the buffer until the copy is done). On the CPU they are stacked as before: pinning needs CUDA.
    """
    if not _pinned_copies(device, tiles):
        return torch.stack(list(tiles)).to(device)
    host = _pinned_empty((len(tiles), *tiles[0].shape))
    torch.stack(list(tiles), out=host)
    return host.to(device, non_blocking=True)


def _pinned_copies(device: torch.device, tiles: Sequence[torch.Tensor]) -> bool:
    """Pinned, non-blocking copies: host tiles going to a CUDA device (the only case they help or even work)."""
    return device.type == "cuda" and all(tile.device.type == "cpu" for tile in tiles)


def _pinned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


@torch.inference_mode()
def encode_tiles(models: Models, tiles: Sequence[torch.Tensor], settings: InferenceSettings
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP prior and solver features of a batch of tiles on one G x G grid.

    Returns:
        logits: (B, G*G, K) float32 cosine similarities patch/query (or SegEarth-OV's pooled logits).
        features: (B, G*G, D) L2-normalised patch features in the models' dtype (VFM, or CLIP tokens).
    """
    clip_tokens, features = embed_tiles(models, tiles, settings)
    if settings.prior == "segearth-ov":
        return segearth_ov_logits(models, tiles, settings), features
    return query_logits(clip_tokens, models.query_embeddings), features


@torch.inference_mode()
def embed_tiles(models: Models, tiles: Sequence[torch.Tensor], settings: InferenceSettings
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """What does not depend on the classes: dense CLIP tokens (B, G*G, E) and solver features (B, G*G, D),
    both L2-normalised, in the models' dtype; the features are the CLIP tokens when the method needs no VFM."""
    grid = models.grid_size(settings.model_res)
    clip_input = to_model_input(tiles, grid * models.clip.patch_size, models.clip_normalization,
                                models.device, models.dtype)
    clip_tokens = models.clip.dense_features(clip_input, settings.clip)  # (B, G*G, E), unit norm
    if clip_tokens.shape[1] != grid * grid:
        raise InputError(f"CLIP produced {clip_tokens.shape[1]} patches but the VFM grid has {grid * grid}")
    if not settings.needs_vfm:
        return clip_tokens, clip_tokens
    if models.vfm is None:
        raise InputError("this method needs a VFM but none is loaded",
                         hint="load one (--vfm), or use method='baseline' or features='clip'")
    vfm_input = to_model_input(tiles, grid * models.vfm.patch_size, models.vfm_normalization,
                               models.device, models.dtype)
    features = models.vfm.dense_features(vfm_input)  # (B, G*G, D), unit norm
    if features.shape[1] != grid * grid:
        raise InputError(
            f"the VFM grid ({features.shape[1]} patches) differs from the CLIP grid ({grid * grid})",
            hint="use models with matching patch grids at this --model-res",
        )
    return clip_tokens, features


def query_logits(clip_tokens: torch.Tensor, query_embeddings: torch.Tensor) -> torch.Tensor:
    """The CLIP prior (B, G*G, K) float32: cosine of each patch token (B, G*G, E) with each query (K, E)."""
    queries = query_embeddings.to(device=clip_tokens.device, dtype=torch.float32)
    return clip_tokens.float() @ queries.T  # (B, G*G, E) @ (E, K) -> (B, G*G, K)


@torch.inference_mode()
def segearth_ov_logits(models: Models, tiles: Sequence[torch.Tensor], settings: InferenceSettings) -> torch.Tensor:
    """SegEarth-OV's prior (B, G*G, K) of the tiles: it needs the pixels (SimFeatUp is guided by the image), so
    it cannot be computed from stored CLIP tokens."""
    grid = models.grid_size(settings.model_res)
    clip_input = to_model_input(tiles, grid * models.clip.patch_size, models.clip_normalization,
                                models.device, models.dtype)
    queries = models.query_embeddings.to(device=clip_input.device, dtype=torch.float32)
    return _segearth_ov_prior(models, clip_input, queries, grid)


def _segearth_ov_prior(models: Models, clip_input: torch.Tensor, queries: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, G*G, K): SegEarth-OV's logits of the tiles (upsampled by SimFeatUp, [CLS] bias subtracted, one window,
    as ConInfer's "+SegEarth-OV" rows run it), area-averaged onto the G x G patch grid."""
    from coninfer.segearth_ov import SegEarthOVSettings, pool_to_grid, slide_logits

    if models.upsampler is None:
        raise InputError("the segearth-ov prior needs a SimFeatUp upsampler but none is loaded",
                         hint="pass --upsampler PATH_OR_HUB_FILE (the released SimFeatUp .ckpt)")
    logits = slide_logits(models.clip, models.upsampler, clip_input.float(), queries,
                          SegEarthOVSettings.coninfer_rerun())  # (B, K, H, W)
    pooled = pool_to_grid(logits, (grid, grid))  # (B, K, G, G)
    return pooled.permute(0, 2, 3, 1).reshape(pooled.shape[0], grid * grid, -1)  # -> (B, G*G, K)


def solve(logits: torch.Tensor, features: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """z (N, K) float32 for all patches of a context: the joint solver (``coninfer``), the decoupled one
    (``decoupled``: prior-free fit, then one fusion), or the prior alone for ``baseline``."""
    if settings.method == "baseline":
        return prior_probabilities(logits, settings.solver)
    return refine(logits, features, settings=settings.solver, joint=settings.method != "decoupled")


@dataclass(frozen=True)
class TileResult:
    """``labels`` (H, W) uint8 and ``probs`` (C, H, W) float32 of one tile at its original size (None when not
    asked for: the evaluation needs labels only, and on a GPU the probabilities would be the largest copy)."""

    labels: np.ndarray
    probs: np.ndarray | None


def infer_tiles(models: Models, images, settings: InferenceSettings = InferenceSettings(),
                output_sizes: Sequence[tuple[int, int]] | None = None, *, probabilities: bool = True
                ) -> list[TileResult]:
    """Segment a batch of RGB tiles with the batch as context (the paper's evaluation path).

    ``images``: (B, H, W, 3) uint8 or a list of (H, W, 3) uint8 arrays. Every tile is resized to the model
    resolution; z is upsampled back to each tile's original size (or ``output_sizes[b]`` as (H, W)).
    """
    return [TileResult(labels.cpu().numpy(), probs.cpu().numpy() if probabilities else None)
            for labels, probs in _tile_outputs(models, images, settings, output_sizes)]


def infer_labels(models: Models, images, settings: InferenceSettings = InferenceSettings(),
                 output_sizes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """:func:`infer_tiles`' labels as (H, W) uint8 tensors left on the models' device: the evaluation counts
    its confusion matrix there (:func:`coninfer.evaluate.metrics.confusion_counts`) and copies back only that."""
    return [labels for labels, _ in _tile_outputs(models, images, settings, output_sizes)]


def _tile_outputs(models: Models, images, settings: InferenceSettings,
                  output_sizes: Sequence[tuple[int, int]] | None):
    """(labels (H, W) uint8, probabilities (C, H, W) float32) of each tile, on the models' device."""
    tiles = as_tile_batch(images)
    logits, features = encode_tiles(models, tiles, settings)
    batch, patches, num_queries = logits.shape
    # (B, G*G, K) -> (B*G*G, K): one joint fit over every patch of every tile
    z = solve(logits.reshape(batch * patches, num_queries), features.reshape(batch * patches, -1), settings)
    grid = models.grid_size(settings.model_res)
    # upsampling to full tile size is the heaviest step after the encoders: keep it on the models' device
    z_grid = patches_to_grid(z.float(), grid, grid)  # (B*G*G, K) -> (B, K, G, G)
    workspace = Workspace()  # reused while the tiles' output sizes repeat
    for index, tile in enumerate(tiles):
        size = tuple(output_sizes[index]) if output_sizes else tuple(tile.shape[1:])
        probs = class_probabilities(z_grid[index : index + 1], size, models.classes.query_to_class,
                                    settings.post.logit_scale, workspace=workspace)[0]
        labels = labels_from_probabilities(probs[None], settings.post.prob_thd, settings.post.bg_index)[0]
        yield labels.to(torch.uint8), probs
