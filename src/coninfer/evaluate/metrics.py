"""Dataset-level IoU accumulation with the semantics of mmsegmentation's ``IoUMetric``.

Per image: pixels whose ground truth equals ``ignore_index`` are dropped. Of the rest, the areas of prediction,
ground truth and their intersection are counted per class 0..C-1; values outside 0..C-1 fall outside the histogram
(mmseg counts with ``torch.histc(min=0, max=C-1)``). Areas are summed over the whole dataset, then

    IoU_c = intersect_c / (pred_c + label_c - intersect_c)      (NaN when the union is 0)
    mIoU  = nanmean_c IoU_c                                      (classes absent everywhere are left out)
    aAcc  = sum_c intersect_c / sum_c label_c

The accumulator keeps a (C+1)x(C+1) confusion matrix whose last row/column collects out-of-range values, so a
ground-truth pixel with, say, value 2 in a 2-class dataset (a JPEG artefact in WBS-SI) still counts toward the
predicted class's area but toward no ground-truth area, exactly like mmseg.

Predictions may be numpy arrays or torch tensors on any device (the tile step's labels, still on the GPU): a
tensor is counted on its own device (:func:`confusion_counts`, the same bins as the numpy path, int64 counts, so
bit-identical) and only the (C+1, C+1) matrix comes back to the host.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from coninfer.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class IoUScores:
    """Scores of a finished accumulation; fractions in [0, 1] (NaN where a class has an empty union)."""

    iou: np.ndarray  # (C,) float64
    accuracy: np.ndarray  # (C,) float64, intersect / label area (mmseg "Acc")
    aacc: float
    miou: float
    class_names: tuple[str, ...]

    def per_class(self) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.class_names, self.iou, strict=True)}


class ConfusionMatrix:
    """Accumulates a confusion matrix over many (prediction, ground truth) pairs.

    ``matrix[g, p]`` counts valid pixels with ground truth ``g`` and prediction ``p``; index ``num_classes`` (the last
    row/column) holds values outside ``0..num_classes-1``.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}", hint="pass the dataset's class count")
        names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        if len(names) != num_classes:
            raise InputError(
                f"class_names has {len(names)} entries for {num_classes} classes", hint="give one name per class"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = names
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def _bins(self, values: np.ndarray) -> np.ndarray:
        values = values.astype(np.int64, copy=False)
        in_range = (values >= 0) & (values < self.num_classes)
        return np.where(in_range, values, self.num_classes)

    def update(self, prediction: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image. ``prediction`` and ``label`` are (H, W) integer arrays (or tensors) of the same shape."""
        self.update_many([(prediction, label)])

    def update_many(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        """Add several (prediction, label) images. Pairs holding a torch tensor are counted on its device and
        summed there, so a batch costs one (C+1, C+1) copy to the host instead of one label map per image."""
        size = self.num_classes + 1
        on_device = None
        for prediction, label in pairs:
            if _is_tensor(prediction) or _is_tensor(label):
                counts = confusion_counts(prediction, label, self.num_classes, self.ignore_index)
                on_device = counts if on_device is None else on_device + counts
                continue
            prediction, label = np.asarray(prediction), np.asarray(label)
            integers = np.issubdtype(prediction.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)
            _check_pair(prediction.shape, label.shape, integers, (prediction.dtype, label.dtype))
            valid = label != self.ignore_index
            # from (g, p) pairs -> flat index g * size + p, counted in one bincount
            flat = self._bins(label[valid]) * size + self._bins(prediction[valid])
            self.matrix += np.bincount(flat, minlength=size * size).reshape(size, size)
        if on_device is not None:
            self.matrix += on_device.cpu().numpy()

    def merge(self, other: ConfusionMatrix) -> None:
        if other.matrix.shape != self.matrix.shape:
            raise InputError("cannot merge confusion matrices of different class counts", hint="same dataset only")
        self.matrix += other.matrix

    @property
    def num_valid_pixels(self) -> int:
        """Ground-truth pixels within 0..C-1 (mmseg's aAcc denominator)."""
        return int(self.matrix[: self.num_classes].sum())

    def scores(self) -> IoUScores:
        c = self.num_classes
        intersect = np.diag(self.matrix)[:c].astype(np.float64)
        area_label = self.matrix[:c, :].sum(axis=1).astype(np.float64)
        area_pred = self.matrix[:, :c].sum(axis=0).astype(np.float64)
        union = area_pred + area_label - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            accuracy = intersect / area_label
        total_label = area_label.sum()
        aacc = float(intersect.sum() / total_label) if total_label > 0 else float("nan")
        miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
        return IoUScores(iou=iou, accuracy=accuracy, aacc=aacc, miou=miou, class_names=self.class_names)

    def foreground_iou(self, foreground_index: int = 1) -> float:
        """IoU of one class (the foreground of single-class datasets), NaN when its union is empty."""
        if not 0 <= foreground_index < self.num_classes:
            raise InputError(
                f"foreground_index {foreground_index} outside 0..{self.num_classes - 1}", hint="use the spec's index"
            )
        return float(self.scores().iou[foreground_index])

    def to_list(self) -> list[list[int]]:
        return self.matrix.tolist()

    @classmethod
    def from_list(
        cls, rows: Sequence[Sequence[int]], *, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> ConfusionMatrix:
        matrix = np.asarray(rows, dtype=np.int64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise InputError(f"bad confusion matrix shape {matrix.shape}", hint="expected (C+1, C+1)")
        result = cls(matrix.shape[0] - 1, ignore_index=ignore_index, class_names=class_names)
        result.matrix[...] = matrix
        return result


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (no tensor exists unless torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _check_pair(prediction_shape, label_shape, integers: bool, dtypes: tuple[Any, Any]) -> None:
    """The same two refusals for numpy arrays and tensors; ``integers``: both dtypes are integer types."""
    if tuple(prediction_shape) != tuple(label_shape):
        raise InputError(
            f"prediction shape {tuple(prediction_shape)} differs from label shape {tuple(label_shape)}",
            hint="predict at the annotation's resolution (upsample the class map to the label size)",
        )
    if not integers:
        raise InputError(
            f"prediction and label must be integer arrays, got {dtypes[0]} and {dtypes[1]}",
            hint="pass class indices, not probabilities",
        )


def confusion_counts(prediction: Any, label: Any, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C+1, C+1) int64 counts ``[g, p]`` of one image, computed with torch on the device of whichever of
    ``prediction`` / ``label`` is a tensor (the other is moved there: a uint8 label map is 1 byte per pixel).

    The bins are :class:`ConfusionMatrix`'s: pixels whose label is ``ignore_index`` are dropped, values outside
    0..C-1 go to bin C. Counting is integer, so the result equals the numpy path bit for bit on any device.
    """
    import torch

    device = next(v.device for v in (prediction, label) if isinstance(v, torch.Tensor))
    prediction, label = (_as_device_tensor(v, device) for v in (prediction, label))
    integers = all(not (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool)
                   for v in (prediction, label))
    _check_pair(prediction.shape, label.shape, integers, (prediction.dtype, label.dtype))
    # compare as int64: torch would wrap an out-of-range ignore_index (e.g. -1 against uint8) to the dtype
    label = label.long()
    size = num_classes + 1
    flat = _torch_bins(label, num_classes) * size + _torch_bins(prediction.long(), num_classes)
    # ignored pixels go to one extra bin that is dropped: no boolean indexing, whose variable size syncs a GPU
    flat = flat.where(label != ignore_index, size * size)
    return torch.bincount(flat.reshape(-1), minlength=size * size + 1)[: size * size].reshape(size, size)


def _torch_bins(values: torch.Tensor, num_classes: int) -> torch.Tensor:
    in_range = (values >= 0) & (values < num_classes)
    return values.where(in_range, num_classes)


def _as_device_tensor(value: Any, device: torch.device) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    array = np.asarray(value)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch has no general uint16/32/64 arithmetic
        array = array.astype(np.int64)  # the numpy path's cast too, so the bins are the same
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
