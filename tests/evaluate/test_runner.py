"""evaluate_dataset: batching, limit, resume after interruption, and agreement with an independent metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from coninfer.errors import InputError
from coninfer.evaluate.runner import EvalResult, evaluate_dataset
from coninfer.evaluate.specs import load_dataset_spec

N_IMAGES = 7


@pytest.fixture
def loveda_root(tmp_path):
    """A converted LoveDA (reduce_zero_label) whose images carry their stored label in channel 0."""
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        stored = rng.integers(0, 7, (5, 6)).astype(np.uint8)  # class 7 (agricultural) never occurs
        image = np.stack([stored, rng.integers(0, 256, (5, 6)), np.full((5, 6), i)], axis=-1).astype(np.uint8)
        for folder, array in (("img_dir/val", image), ("ann_dir/val", stored)):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / folder / f"{3000 + i}.png")
    return tmp_path


def oracle(images):
    """Ground truth: stored k -> k-1; stored 0 is ignored anyway, predict 0 there."""
    return [np.maximum(image[..., 0].astype(int) - 1, 0) for image in images]


def noisy(images):
    return [image[..., 1].astype(int) % 7 for image in images]


def independent_miou(root, limit=N_IMAGES):
    inter, pred_area, label_area = np.zeros(7), np.zeros(7), np.zeros(7)
    for i in range(limit):
        image = np.asarray(Image.open(root / "img_dir/val" / f"{3000 + i}.png"))
        stored = np.asarray(Image.open(root / "ann_dir/val" / f"{3000 + i}.png")).astype(int)
        keep = stored != 0
        label, pred = stored[keep] - 1, (image[..., 1].astype(int) % 7)[keep]
        for c in range(7):
            inter[c] += np.sum((label == c) & (pred == c))
            pred_area[c] += np.sum(pred == c)
            label_area[c] += np.sum(label == c)
    union = pred_area + label_area - inter
    return 100 * np.nanmean(np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan))


def test_ground_truth_scores_100(loveda_root):
    result = evaluate_dataset(load_dataset_spec("LoveDA"), loveda_root, oracle, context_size=3, progress=False)
    assert result.value == pytest.approx(100.0)
    assert result.aacc == pytest.approx(100.0)
    assert result.per_class["agricultural"] is None  # absent from prediction and ground truth
    assert result.n_images == N_IMAGES and result.metric == "mIoU"


def test_random_predictions_match_independent_metric(loveda_root):
    result = evaluate_dataset("loveda", loveda_root, noisy, context_size=3, progress=False)
    assert result.value == pytest.approx(independent_miou(loveda_root))


def test_tensor_predictions_give_the_same_result(loveda_root, monkeypatch):
    """The tile step hands back labels on the model's device: scored there, with the numpy path's result, and the
    runner copies one matrix per batch (update_many), not each prediction (np.asarray of a tensor)."""
    on_host = evaluate_dataset("LoveDA", loveda_root, noisy, context_size=3, progress=False)
    monkeypatch.setattr(np, "asarray", _refuse_tensors(np.asarray))
    on_device = evaluate_dataset("LoveDA", loveda_root, lambda images: [torch.from_numpy(p).to(torch.uint8)
                                                                        for p in noisy(images)],
                                 context_size=3, progress=False)
    assert on_device.to_dict() == on_host.to_dict()


def _refuse_tensors(asarray):
    def checked(value, *args, **kwargs):
        assert not isinstance(value, torch.Tensor), "a prediction tensor was copied to the host"
        return asarray(value, *args, **kwargs)

    return checked


def test_batches_follow_file_order_and_context_size(loveda_root):
    seen = []

    def record(images):
        seen.append([int(image[0, 0, 2]) for image in images])
        return noisy(images)

    evaluate_dataset("LoveDA", loveda_root, record, context_size=3, progress=False)
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]


def test_limit_takes_the_first_images(loveda_root):
    seen = []

    def record(images):
        seen.extend(int(image[0, 0, 2]) for image in images)
        return noisy(images)

    result = evaluate_dataset("LoveDA", loveda_root, record, context_size=2, limit=3, progress=False)
    assert seen == [0, 1, 2] and result.n_images == 3
    assert result.value == pytest.approx(independent_miou(loveda_root, limit=3))


def test_resume_after_interruption_gives_the_same_result(loveda_root, tmp_path):
    state = tmp_path / "state" / "loveda.json"
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return noisy(images)

    with pytest.raises(RuntimeError):
        evaluate_dataset("LoveDA", loveda_root, failing, context_size=3, state_path=state, progress=False)
    assert json.loads(state.read_text())["n_done"] == 3

    resumed_calls = []

    def counting(images):
        resumed_calls.append(len(images))
        return noisy(images)

    resumed = evaluate_dataset("LoveDA", loveda_root, counting, context_size=3, state_path=state, progress=False)
    assert resumed_calls == [3, 1]
    fresh = evaluate_dataset("LoveDA", loveda_root, noisy, context_size=3, progress=False)
    assert resumed.to_dict() == fresh.to_dict()


def test_state_of_other_settings_is_refused(loveda_root, tmp_path):
    state = tmp_path / "state.json"
    evaluate_dataset("LoveDA", loveda_root, noisy, context_size=3, state_path=state, progress=False)
    with pytest.raises(InputError, match="context_size") as info:
        evaluate_dataset("LoveDA", loveda_root, noisy, context_size=4, state_path=state, progress=False)
    assert "delete" in info.value.hint


def test_finished_state_needs_no_prediction(loveda_root, tmp_path):
    state = tmp_path / "state.json"
    first = evaluate_dataset("LoveDA", loveda_root, noisy, state_path=state, progress=False, settings={"prob_thd": 0.8})

    def never(images):
        raise AssertionError("nothing left to predict")

    again = evaluate_dataset("LoveDA", loveda_root, never, state_path=state, progress=False, settings={"prob_thd": 0.8})
    assert again == first
    assert again.settings == {"context_size": 50, "limit": None, "prob_thd": 0.8}


def test_wrong_prediction_shape_is_refused(loveda_root):
    with pytest.raises(InputError, match="resolution"):
        evaluate_dataset("LoveDA", loveda_root, lambda images: [np.zeros((2, 2), int) for _ in images], progress=False)
    with pytest.raises(InputError, match="maps for"):
        evaluate_dataset("LoveDA", loveda_root, lambda images: [], progress=False)


def test_single_class_value_is_foreground_iou(tmp_path):
    for folder, suffix, array in (("image_cvt", ".jpg", np.zeros((4, 4, 3), np.uint8)),
                                  ("label_cvt", ".png", np.array([[0, 1, 1, 0]] * 4, np.uint8))):  # fmt: skip
        (tmp_path / folder).mkdir()
        Image.fromarray(array).save(tmp_path / folder / f"1{suffix}")
    result = evaluate_dataset("DeepGlobe", tmp_path, lambda images: [np.array([[0, 1, 0, 0]] * 4)], progress=False)
    assert result.metric == "IoU_foreground"
    assert result.value == pytest.approx(50.0)
    assert result.per_class == {"background": pytest.approx(100 * 8 / 12), "road": pytest.approx(50.0)}


def test_result_dict_round_trip():
    result = EvalResult("UDD5", "ConInfer", "mIoU", 46.0, {"vegetation": 50.0, "other": None}, 80.0, 3, {"a": 1})
    data = result.to_dict()
    assert set(data) == {"dataset", "method", "metric", "value", "per_class", "aAcc", "n_images", "settings"}
    assert EvalResult.from_dict(json.loads(json.dumps(data))) == result


def test_the_next_batch_is_read_while_this_one_is_predicted(loveda_root, monkeypatch):
    """Batch 0's prediction waits until a sample of batch 1 has been loaded: only a read ahead lets it finish.
    (The wait's timeout only bounds a failing run; a passing one never reaches it.)"""
    import threading

    from coninfer.evaluate import runner

    second_batch_read = threading.Event()
    load = runner.load_sample

    def watched(spec, sample):
        if sample.name == "3003.png":  # the first image of batch 1 (context 3)
            second_batch_read.set()
        return load(spec, sample)

    monkeypatch.setattr(runner, "load_sample", watched)
    waited = []

    def predict(images):
        if not waited:
            waited.append(second_batch_read.wait(timeout=30))
        return noisy(images)

    result = evaluate_dataset("LoveDA", loveda_root, predict, context_size=3, progress=False)
    assert waited == [True]
    assert result.to_dict() == evaluate_dataset("LoveDA", loveda_root, noisy, context_size=3,
                                                progress=False).to_dict()


def test_a_bad_file_in_a_later_batch_stops_there(loveda_root, tmp_path):
    """Read ahead, the damaged image of batch 1 is still reported when batch 1 is scored: batch 0 is counted and
    its state written first, as a serial read would have it."""
    from coninfer.errors import InputFileError

    (loveda_root / "img_dir/val/3004.png").write_bytes(b"not a png")
    state = tmp_path / "state.json"
    predicted = []

    def counting(images):
        predicted.append(len(images))
        return noisy(images)

    with pytest.raises(InputFileError, match="3004.png"):
        evaluate_dataset("LoveDA", loveda_root, counting, context_size=3, state_path=state, progress=False)
    assert predicted == [3] and json.loads(state.read_text())["n_done"] == 3
