"""Tests of coninfer.evaluate.protocol: the paper's per-dataset settings with the run's overrides."""

from __future__ import annotations

from pathlib import Path

from coninfer.encoders import presets
from coninfer.evaluate import dataset_names, load_dataset_spec
from coninfer.evaluate.protocol import RunOptions, protocol_settings
from coninfer.settings import DenseCLIPSettings


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


def test_method_labels():
    from coninfer.evaluate.protocol import method_label
    from coninfer.settings import InferenceSettings

    base = InferenceSettings()
    assert method_label(base) == "ConInfer"
    assert method_label(base.with_values(method="decoupled")) == "ConInfer (decoupled)"
    assert method_label(base.with_values(method="baseline", variant="gem")) == "GEM"
    assert method_label(base.with_values(method="baseline", prior="segearth-ov")) == "SegEarth-OV"
    assert method_label(base.with_values(prior="segearth-ov")) == "ConInfer + SegEarth-OV prior"
