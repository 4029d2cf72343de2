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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coninfer.errors import InputError


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

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """Add one image. ``prediction`` and ``label`` are (H, W) integer arrays of the same shape."""
        prediction = np.asarray(prediction)
        label = np.asarray(label)
        if prediction.shape != label.shape:
            raise InputError(
                f"prediction shape {prediction.shape} differs from label shape {label.shape}",
                hint="predict at the annotation's resolution (upsample the class map to the label size)",
            )
        if not (np.issubdtype(prediction.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)):
            raise InputError(
                f"prediction and label must be integer arrays, got {prediction.dtype} and {label.dtype}",
                hint="pass class indices, not probabilities",
            )
        valid = label != self.ignore_index
        size = self.num_classes + 1
        # from (g, p) pairs -> flat index g * size + p, counted in one bincount
        flat = self._bins(label[valid]) * size + self._bins(prediction[valid])
        self.matrix += np.bincount(flat, minlength=size * size).reshape(size, size)

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
