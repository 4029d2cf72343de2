"""ConfusionMatrix equals an independent per-class computation of mmseg's IoUMetric."""

from __future__ import annotations

import numpy as np
import pytest

from coninfer.errors import InputError
from coninfer.evaluate.loaders import decode_label
from coninfer.evaluate.metrics import ConfusionMatrix
from coninfer.evaluate.specs import load_dataset_spec


def reference_scores(pairs, num_classes, ignore=255):
    """Per-class areas summed over images, as mmseg's intersect_and_union + compute_metrics do."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for pred, label in pairs:
        keep = label != ignore
        p, g = pred[keep], label[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (g == c))
            area_pred[c] += np.sum(p == c)
            area_label[c] += np.sum(g == c)
    union = area_pred + area_label - inter
    iou = np.array([inter[c] / union[c] if union[c] > 0 else np.nan for c in range(num_classes)])
    return iou, np.nanmean(iou), inter.sum() / area_label.sum()


def random_pairs(rng, num_classes, n=4, absent=(), ignore_fraction=0.2):
    pairs = []
    for _ in range(n):
        h, w = rng.integers(3, 9, 2)
        label = rng.integers(0, num_classes, (h, w))
        pred = rng.integers(0, num_classes, (h, w))
        for c in absent:  # a class neither predicted nor labelled anywhere
            label[label == c] = (c + 1) % num_classes
            pred[pred == c] = (c + 1) % num_classes
        label[rng.random((h, w)) < ignore_fraction] = 255
        pairs.append((pred, label.astype(np.uint8)))
    return pairs


class TestConfusionMatrix:
    def test_matches_reference_with_ignore_and_absent_classes(self):
        rng = np.random.default_rng(0)
        pairs = random_pairs(rng, 6, absent=(2,))
        matrix = ConfusionMatrix(6)
        for pred, label in pairs:
            matrix.update(pred, label)
        iou, miou, aacc = reference_scores(pairs, 6)
        scores = matrix.scores()
        assert np.isnan(scores.iou[2]) and np.isnan(iou[2])
        np.testing.assert_allclose(scores.iou, iou, equal_nan=True)
        assert scores.miou == pytest.approx(miou)
        assert scores.aacc == pytest.approx(aacc)

    def test_class_only_in_prediction_scores_zero(self):
        matrix = ConfusionMatrix(3)
        matrix.update(np.array([[0, 2]]), np.array([[0, 0]], np.uint8))
        scores = matrix.scores()
        assert scores.iou[2] == 0.0 and np.isnan(scores.iou[1])
        assert scores.miou == pytest.approx((0.5 + 0.0) / 2)

    def test_reduce_zero_label_then_metrics(self):
        rng = np.random.default_rng(1)
        spec = load_dataset_spec("LoveDA")
        stored = rng.integers(0, 8, (2, 6, 7)).astype(np.uint8)
        stored[0, 0, :3] = 255
        preds = rng.integers(0, 7, (2, 6, 7))
        decoded = [decode_label(s, spec.label_encoding) for s in stored]
        independent = [np.where((s == 0) | (s == 255), 255, s.astype(int) - 1) for s in stored]
        for got, want in zip(decoded, independent, strict=True):
            np.testing.assert_array_equal(got, want)
        matrix = ConfusionMatrix(7)
        for pred, label in zip(preds, decoded, strict=True):
            matrix.update(pred, label)
        iou, miou, _ = reference_scores(list(zip(preds, independent, strict=True)), 7)
        np.testing.assert_allclose(matrix.scores().iou, iou, equal_nan=True)
        assert matrix.scores().miou == pytest.approx(miou)

    def test_out_of_range_label_counts_only_as_prediction_area(self):
        # WBS-SI JPEG masks may decode to 2: mmseg's histograms skip it for the label, not for the prediction
        matrix = ConfusionMatrix(2)
        matrix.update(np.array([[1, 1, 0]]), np.array([[1, 2, 0]], np.uint8))
        scores = matrix.scores()
        assert scores.iou[1] == pytest.approx(1 / 2)
        assert scores.aacc == pytest.approx(2 / 2)
        assert matrix.foreground_iou(1) == pytest.approx(0.5)

    def test_prediction_shape_must_match_label(self):
        with pytest.raises(InputError, match="resolution"):
            ConfusionMatrix(2).update(np.zeros((4, 4), int), np.zeros((4, 5), np.uint8))

    def test_float_predictions_are_refused(self):
        with pytest.raises(InputError, match="integer"):
            ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))

    def test_round_trip_through_list(self):
        rng = np.random.default_rng(2)
        matrix = ConfusionMatrix(4, class_names=["a", "b", "c", "d"])
        for pred, label in random_pairs(rng, 4):
            matrix.update(pred, label)
        again = ConfusionMatrix.from_list(matrix.to_list(), class_names=["a", "b", "c", "d"])
        np.testing.assert_array_equal(again.matrix, matrix.matrix)
        assert again.scores().per_class().keys() == {"a", "b", "c", "d"}

    def test_empty_accumulator_gives_nan(self):
        scores = ConfusionMatrix(2).scores()
        assert np.isnan(scores.miou) and np.isnan(scores.aacc)
