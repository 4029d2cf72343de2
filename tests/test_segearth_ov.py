"""Tests of coninfer.segearth_ov: golden parity on both protocols (fixture H), window layout, [CLS] bias,
post-processing, resize, the per-patch pooling for ConInfer, and the per-dataset settings table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from coninfer.encoders.load_clip import load_clip
from coninfer.encoders.simfeatup import SimFeatUp, load_simfeatup
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.errors import InputError
from coninfer.segearth_ov import (
    DATASET_SETTINGS,
    SegEarthOVSettings,
    keep_ratio_size,
    pool_to_grid,
    postprocess_logits,
    predict,
    resize_logits,
    resized_size,
    segment_image,
    slide_logits,
    slide_windows,
    window_logits,
    window_padding,
)

DATASETS_YAML = Path(__file__).resolve().parents[1] / "src" / "coninfer" / "data" / "datasets.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The JBU is ~1500 small memory-bound ops per window: on a busy CPU, thread synchronisation makes it 5-10x
    slower than one thread (and the fixtures were made with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings_from_meta(meta: dict) -> SegEarthOVSettings:
    """Every setting of a fixture, read from its meta_json."""
    return SegEarthOVSettings(variant=meta["model_type"], ignore_residual=meta["ignore_residual"],
                              cls_token_lambda=meta["cls_token_lambda"], logit_scale=meta["logit_scale"],
                              slide_crop=meta["slide_crop"], slide_stride=meta["slide_stride"],
                              prob_thd=meta["prob_thd"], bg_index=meta["bg_idx"], resize_mode="none")


@pytest.fixture(scope="module")
def golden_runs(golden_dir: Path) -> list[dict]:
    """Every segearthov_*case* / segov_predict2_* fixture, run once."""
    paths = sorted(golden_dir.glob("segearthov_*case*.npz")) + sorted(golden_dir.glob("segov_predict2_*.npz"))
    assert paths, f"no SegEarth-OV fixtures in {golden_dir}"
    clip_config = json.loads((golden_dir / "clip_config.json").read_text())
    return [_golden_run(path, golden_dir, clip_config) for path in paths]


def _golden_run(path: Path, golden_dir: Path, clip_config: dict) -> dict:
    """One fixture file: its arrays, meta, settings, and the merged logits and labels computed here."""
    with np.load(path, allow_pickle=False) as archive:
        data = dict(archive)
    meta = json.loads(str(data.pop("meta_json")))
    clip = load_clip(golden_dir / meta["clip_state_dict"], heads=clip_config["heads"])
    upsampler = load_simfeatup(golden_dir / meta["jbu_state_dict"])
    settings = settings_from_meta(meta)
    images = data["image_u8"] if "image_u8" in data else data["images_u8"]
    queries = torch.from_numpy(data["query_features"])
    logits, labels = [], []
    for image in images:  # one image per call, as the official code
        pixels = torch.from_numpy((image[None].astype(np.float32) - 128) / 64)
        merged = slide_logits(clip, upsampler, pixels, queries, settings)
        result = postprocess_logits(merged, tuple(meta["ori_shape"]), data["query_idx"].tolist(), settings)
        logits.append(merged)
        labels.append(result.labels)
    return {"name": path.name, "data": data, "meta": meta, "settings": settings, "clip": clip,
            "logits": torch.cat(logits), "labels": torch.cat(labels).numpy()}


class TestGoldenParity:
    def test_window_layout(self, golden_runs) -> None:
        for run in golden_runs:
            data, settings = run["data"], run["settings"]
            if "crop_boxes" not in data:
                continue
            height, width = data["image_u8"].shape[-2:]
            windows = slide_windows(height, width, settings.slide_crop, settings.slide_stride)
            assert windows == [tuple(box) for box in data["crop_boxes"].tolist()], run["name"]
            pads = [window_padding(y2 - y1, x2 - x1, run["clip"].patch_size) for y1, y2, x1, x2 in windows]
            assert pads == [tuple(pad) for pad in data["crop_pads"].tolist()], run["name"]

    def test_window_tokens_and_class_rows(self, golden_runs) -> None:
        for run in golden_runs:
            data, clip, settings = run["data"], run["clip"], run["settings"]
            if "crop_boxes" in data:
                pixels = (data["image_u8"].astype(np.float32) - 128) / 64
                windows = [np.pad(pixels[:, :, y1:y2, x1:x2], ((0, 0), (0, 0), (top, bottom), (left, right)))
                           for (y1, y2, x1, x2), (left, right, top, bottom) in zip(data["crop_boxes"],
                                                                                  data["crop_pads"], strict=True)]
                expected_tokens, expected_cls = data["crop_tokens"], data.get("crop_cls")
            else:
                windows = [(image[None].astype(np.float32) - 128) / 64 for image in data["images_u8"]]
                expected_tokens, expected_cls = data["tokens"], data.get("cls")
            for index, window in enumerate(windows):
                tokens, cls = clip.dense_tokens(torch.from_numpy(window), settings.clip_settings, output_cls_token=True)
                np.testing.assert_allclose(tokens[0].numpy(), expected_tokens[index], atol=1e-4, rtol=0)
                if expected_cls is not None:
                    np.testing.assert_allclose(cls[0].numpy(), expected_cls[index], atol=1e-4, rtol=0)

    def test_logits(self, golden_runs) -> None:
        for run in golden_runs:
            data, logits = run["data"], run["logits"]
            if "slide_logits_s4" in data:  # SegEarth-OV: window average, then its resize to ori_shape
                step = run["meta"]["subsample"]
                np.testing.assert_allclose(logits[0, :, ::step, ::step].numpy(), data["slide_logits_s4"], atol=1e-4,
                                           rtol=0, err_msg=run["name"])
                resized = resize_logits(logits, run["meta"]["ori_shape"])
                np.testing.assert_allclose(resized[0, :, ::step, ::step].numpy(), data["seg_logits_s4"], atol=1e-4,
                                           rtol=0, err_msg=run["name"])
            else:  # ConInfer predict2: the forward_feature output of the whole image
                step = run["meta"]["subsample"]
                np.testing.assert_allclose(logits[:, :, ::step, ::step].numpy(), data["logits_s4"], atol=1e-4, rtol=0,
                                           err_msg=run["name"])

    def test_labels_outside_fragile_pixels(self, golden_runs) -> None:
        for run in golden_runs:
            expected = run["data"]["pred"].reshape(run["labels"].shape)
            robust = ~run["data"]["fragile"].reshape(expected.shape)
            assert run["labels"].shape == expected.shape, run["name"]
            mismatches = int((run["labels"] != expected)[robust].sum())
            assert mismatches == 0, f"{run['name']}: {mismatches} label mismatches outside fragile pixels"
            histogram = np.bincount(run["labels"].ravel(), minlength=len(run["meta"]["class_histogram"]))
            assert np.abs(histogram - run["meta"]["class_histogram"]).sum() <= 2 * run["meta"]["n_fragile_pixels"]


@pytest.fixture(scope="module")
def tiny() -> tuple:
    """Tiny random CLIP (E = 32) and SimFeatUp of the same width, with non-trivial weights."""
    upsampler = SimFeatUp(32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in upsampler.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    queries = torch.nn.functional.normalize(torch.randn(3, 32, generator=generator), dim=-1)
    return build_tiny_clip(seed=0), upsampler.eval(), queries


class TestWindows:
    @pytest.mark.parametrize(("size", "crop", "stride", "expected"), [
        (448, 224, 112, [(0, 224), (112, 336), (224, 448)]),
        (500, 224, 112, [(0, 224), (112, 336), (224, 448), (276, 500)]),  # the last window moved back
        (200, 224, 112, [(0, 200)]),  # smaller than the crop: one smaller window
        (224, 224, 112, [(0, 224)]),
        (300, 128, 64, [(0, 128), (64, 192), (128, 256), (172, 300)]),
        (300, 0, 0, [(0, 300)]),  # no sliding
    ])
    def test_windows_along_one_axis(self, size: int, crop: int, stride: int, expected: list) -> None:
        windows = slide_windows(size, 40 if crop else size, crop, stride)
        assert [(y1, y2) for y1, y2, _, _ in windows] == expected  # one column of windows: the rows in order

    def test_padding_puts_the_smaller_half_first(self) -> None:
        assert window_padding(200, 224, 16) == (0, 0, 4, 4)
        assert window_padding(203, 211, 16) == (6, 7, 2, 3)  # (left, right, top, bottom)

    def test_padded_window_is_cut_back(self, tiny) -> None:
        clip, upsampler, queries = tiny
        pixels = torch.randn(1, 3, 58, 53, generator=torch.Generator().manual_seed(0))
        logits = window_logits(clip, upsampler, pixels, queries, SegEarthOVSettings())
        assert logits.shape == (1, 3, 58, 53)

    def test_overlaps_are_averaged(self, tiny) -> None:
        clip, upsampler, queries = tiny
        pixels = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
        settings = SegEarthOVSettings(slide_crop=48, slide_stride=32)
        merged = slide_logits(clip, upsampler, pixels, queries, settings)
        total, count = torch.zeros_like(merged), torch.zeros(64, 80)
        for y1, y2, x1, x2 in slide_windows(64, 80, 48, 32):
            total[..., y1:y2, x1:x2] += window_logits(clip, upsampler, pixels[..., y1:y2, x1:x2], queries, settings)
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1 and count.max() == 4
        torch.testing.assert_close(merged, total / count)


class TestClassTokenBias:
    def test_bias_is_lambda_times_class_similarity(self, tiny) -> None:
        clip, upsampler, queries = tiny
        pixels = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
        plain = window_logits(clip, upsampler, pixels, queries, SegEarthOVSettings(cls_token_lambda=0.0))
        biased = window_logits(clip, upsampler, pixels, queries, SegEarthOVSettings(cls_token_lambda=-0.3))
        _, cls = clip.dense_tokens(pixels, SegEarthOVSettings().clip_settings, output_cls_token=True)
        bias = torch.nn.functional.normalize(cls, dim=-1) @ queries.T  # (B, K)
        torch.testing.assert_close(biased - plain, (-0.3 * bias)[:, :, None, None].expand_as(plain), atol=1e-5,
                                   rtol=0)


class TestPrediction:
    def test_threshold_sends_pixels_to_background(self, tiny) -> None:
        clip, upsampler, queries = tiny
        pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
        loose = predict(clip, upsampler, pixels, queries, [0, 1, 1], SegEarthOVSettings(slide_crop=0))
        strict = predict(clip, upsampler, pixels, queries, [0, 1, 1],
                         SegEarthOVSettings(slide_crop=0, prob_thd=0.9, bg_index=1))
        torch.testing.assert_close(loose.probabilities, postprocess_logits(
            slide_logits(clip, upsampler, pixels, queries, SegEarthOVSettings(slide_crop=0)), (48, 48), [0, 1, 1],
            SegEarthOVSettings()).probabilities)
        below = loose.probabilities.amax(1) < 0.9
        assert below.any() and loose.probabilities.shape == (1, 2, 48, 48)
        assert torch.equal(strict.labels, torch.where(below, torch.ones_like(loose.labels), loose.labels))

    def test_segment_image_returns_the_original_size(self, tiny) -> None:
        clip, upsampler, queries = tiny
        image = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
        settings = SegEarthOVSettings(slide_crop=48, slide_stride=32, resize_size=64)
        result = segment_image(clip, upsampler, image, queries, [0, 1, 2], settings)
        assert result.labels.shape == (70, 50) and result.probabilities.shape == (3, 70, 50)
        with pytest.raises(InputError, match="uint8"):
            segment_image(clip, upsampler, image.astype(np.float32), queries, [0, 1, 2], settings)
        image.flags.writeable = False  # as decoded images and memory maps come
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns on tensors over read-only memory
            again = segment_image(clip, upsampler, image, queries, [0, 1, 2], settings)
        assert torch.equal(again.labels, result.labels)

    def test_bad_queries(self, tiny) -> None:
        clip, upsampler, _ = tiny
        with pytest.raises(InputError, match="queries"):
            slide_logits(clip, upsampler, torch.zeros(1, 3, 48, 48), torch.zeros(2, 16), SegEarthOVSettings())


class TestResize:
    @pytest.mark.parametrize(("shape", "expected"), [
        ((1024, 768), (448, 336)), ((500, 500), (448, 448)), ((100, 150), (299, 448)), ((512, 512), (448, 448)),
    ])
    def test_keep_ratio(self, shape: tuple, expected: tuple) -> None:
        assert keep_ratio_size(*shape) == expected

    def test_modes(self) -> None:
        assert resized_size(1024, 768, SegEarthOVSettings.segearth_ov()) == (448, 336)
        assert resized_size(1024, 768, SegEarthOVSettings.coninfer_rerun()) == (448, 448)
        assert resized_size(1024, 768, SegEarthOVSettings(resize_mode="none")) == (1024, 768)


class TestPoolToGrid:
    def test_block_means(self) -> None:
        logits = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
        grid = pool_to_grid(logits, (2, 3))
        expected = logits.reshape(2, 3, 2, 16, 3, 16).mean(dim=(3, 5))  # (B, K, h, 16, w, 16) -> (B, K, h, w)
        torch.testing.assert_close(grid, expected)

    def test_constant_bias_passes_through(self) -> None:
        logits = torch.randn(1, 2, 32, 32)
        torch.testing.assert_close(pool_to_grid(logits + 0.25, (2, 2)), pool_to_grid(logits, (2, 2)) + 0.25)

    def test_bad_grid(self) -> None:
        with pytest.raises(InputError, match="grid_size"):
            pool_to_grid(torch.zeros(1, 2, 8, 8), (16, 2))


class TestSettings:
    def test_protocols(self) -> None:
        own, rerun = SegEarthOVSettings.segearth_ov(), SegEarthOVSettings.coninfer_rerun()
        assert (own.slide_crop, own.slide_stride, own.resize_mode, own.cls_token_lambda) == (224, 112, "keep_ratio",
                                                                                             -0.3)
        assert (rerun.slide_crop, rerun.resize_mode, rerun.logit_scale) == (0, "fixed", 50.0)
        assert own.clip_settings.attn_lambda == 0.0 and own.clip_settings.variant == "segearth"

    def test_for_dataset(self) -> None:
        whu = SegEarthOVSettings.for_dataset("WHU_Aerial")
        assert (whu.prob_thd, whu.bg_index, whu.slide_crop) == (0.6, 0, 224)
        assert SegEarthOVSettings.for_dataset("WHU_Aerial", "coninfer_rerun").prob_thd == 0.4
        assert SegEarthOVSettings.for_dataset("xBD_pre").cls_token_lambda == 0.0
        assert SegEarthOVSettings.for_dataset("Potsdam", prob_thd=0.2).bg_index == 5
        with pytest.raises(InputError, match="dataset"):
            SegEarthOVSettings.for_dataset("Atlantis")
        with pytest.raises(InputError, match="protocol"):
            SegEarthOVSettings.for_dataset("Potsdam", "predict3")

    def test_table_matches_the_dataset_spec(self) -> None:
        datasets = yaml.safe_load(DATASETS_YAML.read_text())["datasets"]
        assert set(DATASET_SETTINGS) == set(datasets)
        for name, spec in datasets.items():
            own, rerun = spec["segearth_ov"], spec["segearth_ov_rerun"]
            assert DATASET_SETTINGS[name]["segearth_ov"] == (own["prob_thd"], own["bg_idx"], own["cls_token_lambda"])
            assert DATASET_SETTINGS[name]["coninfer_rerun"][0] == rerun["prob_thd"], name

    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"variant": "gem"}, "variant"), ({"logit_scale": 0}, "logit_scale"), ({"slide_stride": 300}, "slide_stride"),
        ({"resize_mode": "crop"}, "resize_mode"), ({"prob_thd": float("nan")}, "prob_thd"),
    ])
    def test_invalid_fields_named(self, kwargs: dict, field: str) -> None:
        with pytest.raises(InputError, match=field):
            SegEarthOVSettings(**kwargs)
