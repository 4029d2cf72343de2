"""From solver output to label maps (golden README, section B).

Per image, in this order: bilinear upsampling of the raw z grid to the output size (half-pixel centres,
``align_corners=False``, no antialias) -> multiply by ``logit_scale`` -> softmax over the K queries -> the
probability of class c is the max over its synonyms (queries q with ``query_to_class[q] == c``) -> argmax over
classes (first index on ties) -> pixels whose max class probability is strictly below ``prob_thd`` become
``bg_index``.

:func:`class_probabilities` and :func:`labels_from_probabilities` are the two halves, so a caller can stitch
probabilities across overlapping tiles before taking labels; :func:`postprocess` runs both.

One deviation: the official code skips the synonym merge whenever the number of classes equals K, even if
``query_to_class`` is a permutation; here the merge always follows ``query_to_class`` (identical for the
identity mapping, the only case the class files produce).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from coninfer.errors import InputError


@dataclass(frozen=True)
class PostprocessResult:
    """``labels`` (B, H, W) int64 and ``probabilities`` (B, C, H, W) float32 (no B axis if the input had none)."""

    labels: torch.Tensor
    probabilities: torch.Tensor


def patches_to_grid(z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Solver output per patch to per-image grids: (B*h*w, K) -> (B, K, h, w), patches row-major per image."""
    if height < 1 or width < 1:
        raise InputError(f"grid size must be positive, got {height} x {width}", hint="pass the patch grid (h, w)")
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[0] % (height * width):
        raise InputError(
            f"z has shape {tuple(z.shape)}, not (B*{height}*{width}, K)",
            hint="pass all patches of whole images, row-major",
        )
    num_images = z.shape[0] // (height * width)
    # (B*h*w, K) -> (B, h, w, K) -> (B, K, h, w)
    return z.reshape(num_images, height, width, z.shape[1]).permute(0, 3, 1, 2)


def _class_index(query_to_class: Sequence[int] | torch.Tensor, num_queries: int) -> list[list[int]]:
    """For each class c, the queries that map to it; checks that every class 0..C-1 has one."""
    raw = list(query_to_class.tolist() if isinstance(query_to_class, torch.Tensor) else query_to_class)
    if num_queries == 0:
        raise InputError("z has no queries (K = 0)", hint="embed at least one query per class")
    if any(isinstance(c, bool) or int(c) != c for c in raw):
        raise InputError(f"query_to_class must hold integer class indices, got {raw}")
    mapping = [int(c) for c in raw]
    if len(mapping) != num_queries:
        raise InputError(
            f"query_to_class has {len(mapping)} entries but z has {num_queries} queries",
            hint="give one class index per query",
        )
    if min(mapping) < 0:
        raise InputError(f"query_to_class holds a negative class index: {mapping}")
    members: list[list[int]] = [[] for _ in range(max(mapping) + 1)]
    for query, cls in enumerate(mapping):
        members[cls].append(query)
    empty = [cls for cls, queries in enumerate(members) if not queries]
    if empty:
        raise InputError(f"classes {empty} have no query in query_to_class {mapping}", hint="number classes 0..C-1")
    return members


class Workspace:
    """The (K, H, W) buffers :func:`class_probabilities` works in, kept from one call to the next by a caller that
    loops over tiles of one size (the stitch pass, the eval's batch): three fresh 8 MB tensors per 448² tile cost
    more in first-touch page faults than the arithmetic on this project's VMs. Not for use by two threads."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], device: torch.device, channels_last: bool = False
               ) -> torch.Tensor:
        """A float32 tensor of ``shape`` on ``device`` (contents undefined), the same one while these hold."""
        layout = torch.channels_last if channels_last else torch.contiguous_format
        tensor = self._buffers.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.device != device \
                or not tensor.is_contiguous(memory_format=layout):
            tensor = self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=device,
                                                       memory_format=layout)
        return tensor


def class_probabilities(
    z_grid: torch.Tensor,
    out_size: tuple[int, int],
    query_to_class: Sequence[int] | torch.Tensor,
    logit_scale: float = 5.0,
    *,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Class probabilities (B, C, H, W) float32 from z grids (B, K, h, w); (K, h, w) gives (C, H, W).

    Images are processed one at a time so the (K, H, W) query probabilities exist for one image only. ``out``:
    a float32 tensor of the result's shape on z's device (any strides) to write them into and return.
    ``workspace``: buffers to reuse across calls (:class:`Workspace`); the values do not depend on it.
    """
    if z_grid.ndim not in (3, 4) or not z_grid.is_floating_point():
        raise InputError(f"z_grid must be a float (B, K, h, w) or (K, h, w) tensor, got {tuple(z_grid.shape)}")
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise InputError(f"logit_scale must be a finite number > 0, got {logit_scale}", hint="the paper uses 5")
    height, width = (int(size) for size in out_size)
    if height < 1 or width < 1:
        raise InputError(f"out_size must be positive, got {tuple(out_size)}")
    batched = z_grid if z_grid.ndim == 4 else z_grid.unsqueeze(0)
    members = _class_index(query_to_class, batched.shape[1])
    shape = (batched.shape[0], len(members), height, width)
    if out is None:
        output = torch.empty(shape, dtype=torch.float32, device=z_grid.device)
    elif tuple(out.shape) != shape[4 - z_grid.ndim :] or out.dtype != torch.float32 or out.device != z_grid.device:
        raise InputError(f"out must be a float32 {shape[4 - z_grid.ndim:]} tensor on {z_grid.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        output = out if z_grid.ndim == 4 else out.unsqueeze(0)
    batched = batched.to(torch.float32)
    workspace = workspace or Workspace()
    num_queries, device = batched.shape[1], z_grid.device
    for image in range(batched.shape[0]):
        grid = batched[image : image + 1]
        # a slice keeps the grid's memory layout (channels-last for patches_to_grid's view, which torch then
        # upsamples with its channels-last kernel; (1, K, h, w) from unsqueeze(0) has strides torch does not
        # recognise and took the slow generic path to the same values)
        channels_last = grid.is_contiguous(memory_format=torch.channels_last) and not grid.is_contiguous()
        upsampled = workspace.buffer("upsampled", (1, num_queries, height, width), device, channels_last)
        torch.ops.aten.upsample_bilinear2d.out(grid, [height, width], False, None, None, out=upsampled)
        # the scaling writes a (K, H, W) contiguous copy, the one torch's softmax of a strided input would make
        planes = (num_queries, height, width)
        scaled = torch.mul(upsampled[0], logit_scale, out=workspace.buffer("scaled", planes, device))
        # torch.softmax's kernel (aten::_softmax), into a buffer
        query_probs = torch.ops.aten._softmax.out(scaled, 0, False, out=workspace.buffer("probs", planes, device))
        for cls, queries in enumerate(members):
            # one query: a copy; several: a running maximum (the same values as amax, without gathering them)
            output[image, cls] = query_probs[queries[0]]
            for query in queries[1:]:
                torch.maximum(output[image, cls], query_probs[query], out=output[image, cls])
    if out is not None:
        return out
    return output if z_grid.ndim == 4 else output[0]


def labels_from_probabilities(probabilities: torch.Tensor, prob_thd: float = 0.0, bg_index: int = 0) -> torch.Tensor:
    """Labels (..., H, W) int64 from class probabilities (..., C, H, W): argmax over C (first index on ties);
    pixels whose max probability is < ``prob_thd`` become ``bg_index`` (``prob_thd`` 0 never fires)."""
    if probabilities.ndim < 3:
        raise InputError(f"probabilities must be (..., C, H, W), got {tuple(probabilities.shape)}")
    labels, best = _argmax_max(probabilities)
    return torch.where(below_threshold(best, prob_thd), torch.full_like(labels, int(bg_index)), labels)


def _argmax_max(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax over dim -3 as int64, max over dim -3) with torch.argmax's rule: the first maximal index, and the
    first NaN where there is one.

    torch.argmax over the class axis of a contiguous (..., C, H, W) tensor walks memory with a stride of H*W and
    takes 20 ms per 448² tile on a CPU core; C element-wise passes take ~1 ms. A class strictly greater than the
    best so far replaces the label (ties keep the first index); a NaN replaces it only while the best is not NaN
    yet (torch.maximum carries the NaN on, so nothing replaces it afterwards). No NaN check needs a host sync."""
    best = probabilities[..., 0, :, :].clone()
    labels = torch.zeros(best.shape, dtype=torch.int64, device=probabilities.device)
    for cls in range(1, probabilities.shape[-3]):
        candidate = probabilities[..., cls, :, :]
        better = candidate > best
        better |= torch.isnan(candidate) & ~torch.isnan(best)
        labels.masked_fill_(better, cls)
        torch.maximum(best, candidate, out=best)
    return labels, best


def labels_from_probabilities_np(probabilities: np.ndarray, prob_thd: float = 0.0, bg_index: int = 0) -> np.ndarray:
    """:func:`labels_from_probabilities` for numpy (C, H, W) -> (H, W) uint8: the same rule (the stitched
    scene path, whose probabilities are blended on the host)."""
    labels, best = _argmax_max_np(probabilities)
    labels[below_threshold(best, prob_thd)] = bg_index
    return labels


_STRIP_PIXELS = 1 << 17
"""Pixels per strip of :func:`_argmax_max_np` (64 rows of a 2048-wide block): its running best, mask and
labels of a strip stay in the core's cache across the C passes; over whole blocks each pass went to memory
(448 x 2048 block, 6 classes, 2-core EPYC: 10.1 -> 5.6-6.5 ms, benchmarks/bench_blocks.py)."""


def _argmax_max_np(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax over axis 0 as uint8, max over axis 0), the argmax numpy's (first maximal index, NaN wins).

    numpy's argmax over the leading axis of a (C, H, W) array walks memory with a stride of H*W and is ~10x
    slower than C element-wise passes, which this takes, strip of rows by strip: a strictly greater class
    replaces the label, so ties keep the first index. NaN (never greater, but propagated by np.maximum) falls
    back to numpy's rule."""
    if len(probabilities) > 256:  # more classes than uint8 holds: numpy's wrapping cast, as before
        return probabilities.argmax(axis=0).astype(np.uint8), probabilities.max(axis=0)
    best = np.empty(probabilities.shape[1:], probabilities.dtype)
    labels = np.zeros(best.shape, np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, int(np.prod(best.shape[1:]))))
    better = np.empty((rows, *best.shape[1:]), bool)
    step = np.empty(better.shape, np.uint8)
    for top in range(0, len(best), rows):
        strip = slice(top, top + rows)
        strip_best, strip_labels = best[strip], labels[strip]
        strip_better, strip_step = better[: len(strip_best)], step[: len(strip_best)]
        np.copyto(strip_best, probabilities[0, strip])
        for cls in range(1, len(probabilities)):
            candidate = probabilities[cls, strip]
            np.greater(candidate, strip_best, out=strip_better)
            # labels < cls here, so cls - labels never wraps; adding it where better sets those labels to cls
            np.subtract(np.uint8(cls), strip_labels, out=strip_step)
            np.multiply(strip_step, strip_better, out=strip_step)
            strip_labels += strip_step
            np.maximum(strip_best, candidate, out=strip_best)
    if np.isnan(best).any():
        return probabilities.argmax(axis=0).astype(np.uint8), best
    return labels, best


def below_threshold(best, prob_thd: float):
    """The one ``prob_thd`` rule: strictly below fires, so 0 never does (torch or numpy)."""
    return best < prob_thd


def postprocess(
    z_grid: torch.Tensor,
    out_size: tuple[int, int],
    query_to_class: Sequence[int] | torch.Tensor,
    *,
    logit_scale: float = 5.0,
    prob_thd: float = 0.0,
    bg_index: int = 0,
) -> PostprocessResult:
    """Labels and class probabilities at ``out_size`` from z grids (B, K, h, w) or (K, h, w)."""
    probabilities = class_probabilities(z_grid, out_size, query_to_class, logit_scale)
    return PostprocessResult(labels_from_probabilities(probabilities, prob_thd, bg_index), probabilities)
