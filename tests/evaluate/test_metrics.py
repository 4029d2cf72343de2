"""ConfusionMatrix equals an independent per-class computation of mmseg's IoUMetric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coninfer.errors import InputError
from coninfer.evaluate.loaders import decode_label
from coninfer.evaluate.metrics import ConfusionMatrix, confusion_counts
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


class TestConfusionOnTheDevice:
    """Tensors (the tile step's labels, on the model's device) are counted with torch: the same int64 matrix."""

    @pytest.mark.parametrize("seed", range(4))
    def test_equals_the_numpy_matrix_bit_for_bit(self, seed):
        rng = np.random.default_rng(seed)
        num_classes = int(rng.integers(1, 12))
        numpy_matrix, torch_matrix = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
        for _ in range(5):
            h, w = rng.integers(1, 40, 2)
            # out-of-range values on both sides (bin C) and ignored pixels (255)
            label = rng.integers(0, num_classes + 3, (h, w)).astype(np.uint8)
            label[rng.random((h, w)) < 0.25] = 255
            pred = rng.integers(-2, num_classes + 3, (h, w))
            numpy_matrix.update(pred, label)
            torch_matrix.update(torch.from_numpy(pred), label)
        assert torch_matrix.matrix.dtype == np.int64
        np.testing.assert_array_equal(torch_matrix.matrix, numpy_matrix.matrix)
        assert numpy_matrix.matrix[num_classes].sum() > 0 and numpy_matrix.matrix[:, num_classes].sum() > 0

    def test_counts_stay_a_tensor_on_the_device(self):
        pred, label = torch.tensor([[0, 1, 2], [1, 1, 0]]), torch.tensor([[0, 1, 255], [2, 1, 7]], dtype=torch.uint8)
        counts = confusion_counts(pred, label, 3)
        assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int64 and counts.shape == (4, 4)
        expected = np.zeros((4, 4), np.int64)
        for g, p in ((0, 0), (1, 1), (2, 1), (1, 1), (3, 0)):  # 255 ignored, label 7 -> bin 3
            expected[g, p] += 1
        np.testing.assert_array_equal(counts.numpy(), expected)

    def test_ignore_index_outside_the_label_dtype(self):
        # -1 against a uint8 label: numpy ignores nothing; torch must not wrap -1 to 255 and ignore those pixels
        pred, label = np.array([[0, 1]]), np.array([[255, 1]], np.uint8)
        numpy_matrix, torch_matrix = ConfusionMatrix(2, ignore_index=-1), ConfusionMatrix(2, ignore_index=-1)
        numpy_matrix.update(pred, label)
        torch_matrix.update(torch.from_numpy(pred), label)
        np.testing.assert_array_equal(torch_matrix.matrix, numpy_matrix.matrix)

    def test_a_batch_is_one_sum(self):
        rng = np.random.default_rng(5)
        pairs = random_pairs(rng, 4, n=6)
        one_by_one, batch = ConfusionMatrix(4), ConfusionMatrix(4)
        for pred, label in pairs:
            one_by_one.update(pred, label)
        # mixed: tensors and numpy pairs in one call
        batch.update_many([(torch.from_numpy(p) if i % 2 else p, label) for i, (p, label) in enumerate(pairs)])
        np.testing.assert_array_equal(batch.matrix, one_by_one.matrix)

    def test_the_same_refusals(self):
        with pytest.raises(InputError, match="resolution"):
            ConfusionMatrix(2).update(torch.zeros((4, 4), dtype=torch.long), np.zeros((4, 5), np.uint8))
        with pytest.raises(InputError, match="integer"):
            ConfusionMatrix(2).update(torch.zeros((2, 2)), np.zeros((2, 2), np.uint8))
