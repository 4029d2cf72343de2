"""Tests of coninfer.evaluate.protocol: the paper's per-dataset settings with the run's overrides."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coninfer.encoders import presets
from coninfer.errors import InputError
from coninfer.evaluate import dataset_names, load_dataset_spec
from coninfer.evaluate.protocol import (
    RunOptions,
    _segearth_ov_predictor,
    method_label,
    protocol_settings,
    segearth_ov_settings,
)
from coninfer.segearth_ov import DATASET_SETTINGS
from coninfer.settings import DenseCLIPSettings, InferenceSettings


def _run(**overrides) -> RunOptions:
    values = {"method": "coninfer", "vlm": "clip-b16", "vfm": None, "vlm_variant": None, "attn_lambda": None,
              "vfm_features": "vfm", "context_size": 50, "limit": None, "state_root": Path("."), "progress": False}
    return RunOptions(**{**values, **overrides})


class TestProtocolSettings:
    def test_dataset_config_and_overrides(self):
        spec = load_dataset_spec("Vaihingen")
        config = spec.coninfer
        settings = protocol_settings(spec, _run())
        assert settings.clip == DenseCLIPSettings("segearth", True, config.attn_lambda)
        assert (settings.solver.temperature, settings.post.logit_scale) == (config.gmm_temp, config.logit_scale)
        assert (settings.post.prob_thd, settings.post.bg_index) == (config.prob_thd, config.bg_index)
        assert protocol_settings(spec, _run(vlm_variant="clearclip")).clip == DenseCLIPSettings.for_variant("clearclip")
        assert protocol_settings(spec, _run(vlm_variant="maskclip", attn_lambda=0.4)).clip == DenseCLIPSettings(
            "maskclip", False, 0.4)
        tuned = protocol_settings(spec, _run(temperature=20.0, iterations=3))
        assert (tuned.solver.temperature, tuned.solver.iterations) == (20.0, 3)

    def test_baseline_uses_the_baseline_threshold_and_needs_no_vfm(self):
        spec = load_dataset_spec("Potsdam")
        settings = protocol_settings(spec, _run(method="baseline"))
        assert settings.post.prob_thd == spec.coninfer.baseline_prob_thd and not settings.needs_vfm
        assert not protocol_settings(spec, _run(vfm_features="clip")).needs_vfm

    def test_every_dataset_vfm_is_a_preset(self):
        for name in dataset_names():
            preset = presets.get_preset(load_dataset_spec(name).coninfer.vfm_preset, "vfm")
            assert preset.format == "timm"
        assert load_dataset_spec("UAVid").coninfer.vfm_preset == "dinov3-h16plus-lvd"


def test_method_labels_name_the_paper_rows():
    from coninfer.evaluate.report import paper_method

    base = InferenceSettings()
    labels = {
        "ConInfer": method_label(base),
        "ConInfer (decoupled)": method_label(base.with_values(method="decoupled")),
        "baseline": method_label(base.with_values(method="baseline")),
        "GEM": method_label(base.with_values(method="baseline", variant="gem")),
        "ClearCLIP": method_label(base.with_values(method="baseline", variant="clearclip")),
        "ClearCLIP+ConInfer": method_label(base.with_values(variant="clearclip")),
        "ConInfer + SegEarth-OV prior": method_label(base.with_values(prior="segearth-ov", variant="sclip")),
        "ConInfer (decoupled) + SegEarth-OV prior": method_label(base.with_values(method="decoupled",
                                                                                  prior="segearth-ov")),
    }
    assert all(label == found for label, found in labels.items()), labels
    baseline = base.with_values(method="baseline", prior="segearth-ov")
    own, rerun = (segearth_ov_settings(load_dataset_spec("WBS-SI"), _run(method="baseline", prior="segearth-ov",
                                                                          segearth_protocol=p, vlm_variant=v))
                  for p, v in (("segearth-ov", None), ("coninfer-rerun", "maskclip")))
    assert method_label(baseline, own) == "SegEarth-OV"
    assert method_label(baseline, rerun) == "MaskCLIP+SegEarth-OV"  # Table 2's row
    assert method_label(baseline, replace(rerun, variant="segearth")) == "SegEarth-OV (ConInfer re-run)"
    assert method_label(baseline, replace(own, variant="sclip")) == "SCLIP+SegEarth-OV (SegEarth-OV protocol)"
    assert [paper_method(label) for label in labels] == [
        "ConInfer", "No joint-learning", "MaskCLIP* (baseline)", "GEM", "ClearCLIP", "ClearCLIP+ConInfer", "ConInfer",
        "No joint-learning"]


class TestSegEarthOVProtocols:
    def test_own_protocol_is_the_default_of_the_baseline(self):
        settings = segearth_ov_settings(load_dataset_spec("Potsdam"), _run(method="baseline", prior="segearth-ov"))
        assert (settings.resize_mode, settings.resize_size, settings.slide_crop, settings.slide_stride) == (
            "keep_ratio", 448, 224, 112)
        assert (settings.prob_thd, settings.bg_index, settings.cls_token_lambda) == (0.1, 5, -0.3)
        assert (settings.variant, settings.ignore_residual, settings.logit_scale) == ("segearth", True, 50.0)

    def test_coninfer_rerun_takes_configs_segov_thresholds(self):
        run = _run(method="baseline", prior="segearth-ov", segearth_protocol="coninfer-rerun")
        settings = segearth_ov_settings(load_dataset_spec("WHU_Aerial"), run)
        assert (settings.resize_mode, settings.slide_crop, settings.prob_thd) == ("fixed", 0, 0.4)
        xbd = segearth_ov_settings(load_dataset_spec("xBD_pre"), run)
        assert (xbd.cls_token_lambda, xbd.prob_thd) == (0.0, 0.0)

    @pytest.mark.parametrize(("variant", "ignore_residual"), [("maskclip", False), ("sclip", False),
                                                               ("clearclip", True)])
    def test_table2_variants_swap_the_dense_clip(self, variant, ignore_residual):
        run = _run(method="baseline", prior="segearth-ov", segearth_protocol="coninfer-rerun", vlm_variant=variant)
        settings = segearth_ov_settings(load_dataset_spec("OpenEarthMap"), run)
        assert (settings.variant, settings.ignore_residual) == (variant, ignore_residual)
        assert settings.clip_settings.attn_lambda == 0.0

    def test_not_a_segearth_ov_alone_run(self):
        assert segearth_ov_settings(load_dataset_spec("Potsdam"), _run(method="baseline")) is None
        for method in ("coninfer", "decoupled"):  # ConInfer refines the re-run's prior, in the tile step
            assert segearth_ov_settings(load_dataset_spec("Potsdam"), _run(method=method, prior="segearth-ov")) is None

    @pytest.mark.parametrize(("overrides", "message"), [
        ({"segearth_protocol": "coninfer-rerun"}, "--segearth-protocol needs --prior segearth-ov"),
        ({"prior": "segearth-ov", "segearth_protocol": "segearth-ov"}, "not under --method coninfer"),
        ({"prior": "segearth-ov", "method": "baseline", "vlm_variant": "gem"}, "--vlm-variant gem does not apply"),
        ({"prior": "segearth-ov", "method": "baseline", "attn_lambda": 0.3}, "--attn-lambda does not apply"),
        ({"prior": "segearth-ov", "method": "baseline", "segearth_protocol": "own"}, "'own' is unknown"),
    ])  # fmt: skip
    def test_contradictory_flags_are_named(self, overrides, message):
        with pytest.raises(InputError, match=message):
            segearth_ov_settings(load_dataset_spec("Potsdam"), _run(**overrides))

    def test_dataset_settings_match_the_dataset_spec(self):
        """DATASET_SETTINGS (from the golden README) against datasets.yaml (from the configs), every dataset."""
        from coninfer.evaluate.specs import _raw_specs

        raw = _raw_specs()["datasets"]
        assert set(DATASET_SETTINGS) == set(dataset_names())
        for name in dataset_names():
            own, rerun = raw[name]["segearth_ov"], raw[name]["segearth_ov_rerun"]
            lam = own.get("cls_token_lambda", -0.3)
            assert DATASET_SETTINGS[name]["segearth_ov"] == (own["prob_thd"], own.get("bg_idx", 0), lam), name
            assert DATASET_SETTINGS[name]["coninfer_rerun"][0] == rerun["prob_thd"], name
            assert DATASET_SETTINGS[name]["coninfer_rerun"][2] == rerun.get("cls_token_lambda", lam), name

    @pytest.mark.parametrize(("protocol", "expected"), [("segearth-ov", "segearth"), ("coninfer-rerun", "coninfer")])
    def test_prompts_of_each_protocol(self, protocol, expected):
        """SegEarth-OV's own run uses its configs/cls_*.txt (LoveDA's differ from ConInfer's), the re-run ConInfer's."""
        spec = load_dataset_spec("LoveDA")
        seen = []

        class Clip:
            def encode_queries(self, queries):
                seen.append(list(queries))
                raise StopIteration  # the queries are all this test needs

        class Encoders:
            def get(self, vlm, vfm):
                return Clip(), None

            def upsampler(self, source):
                return None

        run = _run(method="baseline", prior="segearth-ov", segearth_protocol=protocol, upsampler="tiny-random")
        settings = segearth_ov_settings(spec, run)
        predict, recorded = _segearth_ov_predictor(spec, Encoders(), run, protocol_settings(spec, run), settings)
        with pytest.raises(StopIteration):
            predict([])
        lines = [c.segearth_queries or c.queries for c in spec.classes] if expected == "segearth" else [
            c.queries for c in spec.classes]
        assert seen == [[query for line in lines for query in line]] and recorded["prompts"] == (
            "segearth_ov" if expected == "segearth" else "coninfer")
        assert any(c.segearth_queries and c.segearth_queries != c.queries for c in spec.classes)  # they differ
