"""How much memory a scene run needs, checked before anything large is allocated.

A run holds little at a time (tiles come in batches, the stitcher one band of tile rows, the stores live on
disk), but what it holds grows with ``--tile-size`` (squared) and ``--batch-size``: a tile of 100,000 px or a
batch of 512 large tiles asks for tens of GiB at once, and the allocation then fails with a traceback (or the
kernel kills the process) after the work folder was made. :func:`check_memory` compares the estimate of
:func:`estimate_run_memory` with the memory available and, when it does not fit, raises one
:class:`~coninfer.errors.ResourceError` naming the option to change and a value that fits.

The estimate is the peak of the phases of a run (they do not overlap: the encoders' batch is freed before the
stitcher's band is made), each the sum of the arrays that phase holds at once:

- encode: the batch of tiles (uint8 RGB + mask) and one tile read in float64 before the stretch; the model
  inputs (float32 at tile size, then each encoder's input at its resolution); one transformer layer's
  activations (residual, q/k/v, MLP hidden, the attention matrix); the batch's embeddings and logits.
- solve: one chunk of stored tiles (features and logits) and the solver's per-patch work arrays.
- stitch: the band, (C + 1) x tile_size x scene width float32 (on the GPU in a CUDA run), and one tile's
  query and class probabilities at tile size.
- in memory (``segment_array`` only, for the whole run): the stores and the (C, H, W) output arrays.

On CUDA the model-side arrays are counted against the GPU's free memory and the rest against the host's.
The estimate leaves out allocator slack, hence :data:`HEADROOM`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coninfer.errors import ResourceError

HEADROOM = 0.9
"""Fraction of the available memory a run may plan to use (allocator slack, fragmentation, small arrays)."""
_MEMINFO = Path("/proc/meminfo")
_CGROUP_V2 = Path("/sys/fs/cgroup")
_F32 = 4


@dataclass(frozen=True)
class EncoderShape:
    """What sizes one encoder's activations: a ViT fed ``input_side`` px squares."""

    input_side: int
    patch_size: int
    width: int
    heads: int
    mlp_width: int
    prefix_tokens: int
    out_dim: int

    @property
    def tokens(self) -> int:
        return (self.input_side // self.patch_size) ** 2 + self.prefix_tokens


@dataclass(frozen=True)
class RunShape:
    """Everything the estimate depends on; ``tile_size`` is the grid's (a tile is at most the scene)."""

    tile_size: int
    batch_size: int
    scene_width: int
    scene_height: int
    grid_side: int
    num_classes: int
    num_queries: int
    encoders: tuple[EncoderShape, ...]
    overlap: int = 0
    solver_chunk_tiles: int = 64
    dtype_bytes: int = _F32
    on_cuda: bool = False
    in_memory: bool = False

    @property
    def num_tiles(self) -> int:
        stride = max(1, self.tile_size - self.overlap)
        cols = 1 + math.ceil(max(self.scene_width - self.tile_size, 0) / stride)
        rows = 1 + math.ceil(max(self.scene_height - self.tile_size, 0) / stride)
        return rows * cols


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on the host and on the GPU (0 on a CPU run); ``parts``: bytes per named array group."""

    host_bytes: int
    device_bytes: int
    parts: dict[str, int]


@dataclass(frozen=True)
class _Part:
    name: str
    nbytes: int
    on_model_device: bool  # on the GPU in a CUDA run, on the host otherwise


def _encode_phase(shape: RunShape) -> list[_Part]:
    batch, tile, patches = shape.batch_size, shape.tile_size, shape.grid_side**2
    dtype = shape.dtype_bytes
    inputs = batch * 3 * tile * tile * _F32 + sum(batch * 3 * e.input_side**2 * (_F32 + dtype) for e in shape.encoders)
    layer = max((batch * e.tokens * (5 * e.width + e.mlp_width) * dtype + batch * e.heads * e.tokens**2 * dtype
                 for e in shape.encoders), default=0)
    out_dim = sum(e.out_dim for e in shape.encoders)
    return [
        _Part("tile pixels", batch * tile * tile * 4 + tile * tile * 3 * 8, False),
        _Part("model inputs", inputs, True),
        _Part("encoder activations", layer, True),
        _Part("embeddings", batch * patches * out_dim * dtype, True),
        # this batch's (twice while converted) and the one the store writer still holds (pipeline.OneBehind)
        _Part("embeddings (host copy)", 4 * batch * patches * out_dim * _F32, False),
        _Part("logits", batch * patches * shape.num_queries * _F32, True),
    ]


def _solve_phase(shape: RunShape) -> list[_Part]:
    rows = min(shape.solver_chunk_tiles, shape.num_tiles) * shape.grid_side**2
    feature_dim = shape.encoders[-1].out_dim if shape.encoders else 0
    return [_Part("solver chunk", rows * (2 * feature_dim + 4 * shape.num_queries) * _F32, True)]


def _stitch_phase(shape: RunShape) -> list[_Part]:
    area = shape.tile_size**2
    return [
        # a CUDA run keeps the band on the GPU (pipeline.stitch_scene's band_device)
        _Part("stitcher band", (shape.num_classes + 1) * shape.tile_size * shape.scene_width * _F32, True),
        _Part("tile probabilities", (shape.num_queries + shape.num_classes) * area * _F32, True),
        _Part("tile probabilities (host copy)", 2 * shape.num_classes * area * _F32, False),
    ]


def _resident(shape: RunShape) -> list[_Part]:
    if not shape.in_memory:
        return []
    area = shape.scene_width * shape.scene_height
    clip_dim = shape.encoders[0].out_dim if shape.encoders else 0
    feature_dim = shape.encoders[-1].out_dim if shape.encoders else 0
    per_patch = 2 * feature_dim + _F32 * clip_dim + 1 + 2 * _F32 * shape.num_queries  # float16 features, ...
    return [
        _Part("in-memory stores", shape.num_tiles * shape.grid_side**2 * per_patch, False),
        _Part("in-memory outputs", area * (1 + _F32 * shape.num_classes), False),
    ]


def estimate_run_memory(shape: RunShape) -> MemoryEstimate:
    """Peak host and GPU bytes of a run of ``shape`` (see the module docstring for what is counted)."""
    resident = _resident(shape)
    host_peak = device_peak = 0
    parts = {part.name: part.nbytes for part in resident}
    for phase in (_encode_phase(shape), _solve_phase(shape), _stitch_phase(shape)):
        on_device = sum(p.nbytes for p in phase if p.on_model_device and shape.on_cuda)
        on_host = sum(p.nbytes for p in phase) - on_device
        host_peak, device_peak = max(host_peak, on_host), max(device_peak, on_device)
        parts.update({part.name: part.nbytes for part in phase})
    host_peak += sum(part.nbytes for part in resident)
    return MemoryEstimate(host_bytes=host_peak, device_bytes=device_peak, parts=parts)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_value(path: Path, key: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split(maxsplit=1) for line in lines if " " in line)
    return int(values.get(key, "0").strip() or 0)


def _cgroup_available(root: Path = _CGROUP_V2) -> int | None:
    """Memory left under the container's limit (docker, Kubernetes, batch schedulers), which MemAvailable does
    not see; reclaimable page cache (inactive files) counts as free, as the kernel would reclaim it first."""
    for folder, limit_name, usage_name, cache_key in ((root, "memory.max", "memory.current", "inactive_file"),
                                                      (root / "memory", "memory.limit_in_bytes",
                                                       "memory.usage_in_bytes", "total_inactive_file")):
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is not None and usage is not None and limit < 2**60:  # cgroup v1 writes ~2**63 for no limit
            return max(0, limit - usage + _stat_value(folder / "memory.stat", cache_key))
    return None


def _meminfo_available(meminfo: Path = _MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_host_memory() -> int | None:
    """Bytes the run may still allocate on the host: /proc/meminfo's MemAvailable (else psutil, else
    ``os.sysconf``'s free pages), capped by the cgroup's limit; None when none of them can tell."""
    available = _meminfo_available()
    if available is None:
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            available = int(psutil.virtual_memory().available)
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = None
    limit = _cgroup_available()
    return limit if available is None else available if limit is None else min(available, limit)


def available_device_memory(device: Any) -> int | None:
    """Free bytes on a CUDA ``device`` (what the driver reports plus what torch's cache holds unused); None
    off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _fits(shape: RunShape, host: int | None, device: int | None) -> bool:
    estimate = estimate_run_memory(shape)
    return ((host is None or estimate.host_bytes <= HEADROOM * host)
            and (device is None or estimate.device_bytes <= HEADROOM * device))


def _fix(shape: RunShape, host: int | None, device: int | None) -> str | None:
    """The least change that fits: the largest --batch-size (results do not depend on it), else with batch 1
    the largest --tile-size (a multiple of 16); None when not even 16 px tiles one at a time fit."""
    for batch in range(shape.batch_size - 1, 0, -1):
        if _fits(replace(shape, batch_size=batch), host, device):
            return f"--batch-size {batch}"
    low, high = 1, shape.tile_size // 16  # tile = 16 * k
    if not _fits(replace(shape, batch_size=1, tile_size=16, overlap=0), host, device):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        trial = replace(shape, batch_size=1, tile_size=16 * middle, overlap=min(shape.overlap, 8 * middle - 1))
        low, high = (middle, high) if _fits(trial, host, device) else (low, middle - 1)
    return f"--tile-size {16 * low} --batch-size 1"


def check_memory(shape: RunShape, *, available_host: int | None = None, available_device: int | None = None,
                 device: Any = "cuda") -> MemoryEstimate:
    """The estimate of a run of ``shape``; raises :class:`ResourceError` (one line naming ``--tile-size`` /
    ``--batch-size`` and values that fit) when it exceeds :data:`HEADROOM` of the available memory.

    ``available_host`` / ``available_device`` (bytes) default to what the machine reports now (the GPU only when
    ``shape.on_cuda``, for ``device``); a memory that cannot be measured is not checked.
    """
    host = available_host if available_host is not None else available_host_memory()
    gpu = available_device if available_device is not None else (
        available_device_memory(device) if shape.on_cuda else None)
    estimate = estimate_run_memory(shape)
    if _fits(shape, host, gpu):
        return estimate
    on_gpu = gpu is not None and estimate.device_bytes > HEADROOM * gpu
    needed, available = (estimate.device_bytes, gpu) if on_gpu else (estimate.host_bytes, host)
    largest = max(estimate.parts, key=estimate.parts.__getitem__)
    fix = _fix(shape, host, gpu)
    if fix is not None:
        hint = f"use {fix}"
    elif shape.in_memory:
        hint = "segment it as a file with `coninfer segment` or Segmenter.segment_file, whose stores live on disk"
    else:
        hint = "free memory, or use a machine with more"
    raise ResourceError(
        f"--tile-size {shape.tile_size} with --batch-size {shape.batch_size} needs about {_gib(needed)} of "
        f"{'GPU' if on_gpu else 'host'} memory ({largest} the largest part), but only {_gib(int(available or 0))} "
        "is free",
        hint=hint,
    )


def run_shape(models: Any, settings: Any, grid: Any, options: Any, *, in_memory: bool = False) -> RunShape:
    """The :class:`RunShape` of a run of ``models`` (a :class:`~coninfer.tile_step.Models`) with ``settings``
    (:class:`~coninfer.settings.InferenceSettings`) over ``grid`` (from ``pipeline.scene_grid``), cut as
    ``options`` (:class:`~coninfer.settings.SceneOptions`) says."""
    side = models.grid_size(settings.model_res)
    clip_dim = int(models.query_embeddings.shape[-1])
    encoders = [_encoder_shape(models.clip, side, _config(models.clip), clip_dim, 1)]
    if models.vfm is not None and settings.needs_vfm:
        vfm = models.vfm
        width = getattr(_config(vfm), "hidden_size", None)
        out_dim = int(getattr(vfm, "feature_dim", None) or width or _PLUGIN_WIDTH)
        encoders.append(_encoder_shape(vfm, side, _config(vfm), out_dim, int(getattr(vfm, "num_prefix_tokens", 1))))
    dtype_bytes = int(getattr(models.dtype, "itemsize", _F32))
    chunk = options.context_size if options.context == "batch" else options.solver_chunk_tiles
    return RunShape(tile_size=grid.tile_size, batch_size=options.batch_size, scene_width=grid.width,
                    scene_height=grid.height, grid_side=side, num_classes=len(models.classes.names),
                    num_queries=len(models.classes.queries), encoders=tuple(encoders), overlap=grid.overlap,
                    solver_chunk_tiles=max(chunk, options.solver_chunk_tiles), dtype_bytes=dtype_bytes,
                    on_cuda=str(models.device).startswith("cuda"), in_memory=in_memory)


_PLUGIN_WIDTH = 1024
"""Feature width assumed for a registered encoder that states none (ViT-L's: the large end of the presets)."""


def _config(encoder: Any) -> Any:
    """The transformers config sizing ``encoder``'s layers, or None: the encoder protocol asks only for
    ``dense_features``, ``patch_size``, ``normalization``, ``name`` and ``fingerprint``, so a plug-in encoder
    is estimated as a ViT as wide as its output."""
    return getattr(encoder, "vision_config", None) or getattr(getattr(encoder, "model", None), "config", None)


def _encoder_shape(encoder: Any, side: int, config: Any, out_dim: int, prefix_tokens: int) -> EncoderShape:
    width = int(getattr(config, "hidden_size", out_dim))
    return EncoderShape(input_side=side * encoder.patch_size, patch_size=encoder.patch_size, width=width,
                        heads=int(getattr(config, "num_attention_heads", max(1, width // 64))),
                        mlp_width=int(getattr(config, "intermediate_size", 4 * width) or 4 * width),
                        prefix_tokens=prefix_tokens, out_dim=out_dim)
