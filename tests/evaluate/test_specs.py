"""Dataset specs: lookup, the paper's settings, and agreement with the shared data specification."""

from __future__ import annotations

import csv
from importlib import resources

import pytest
import yaml

from coninfer.encoders.normalization import IMAGENET, SAT493M
from coninfer.encoders.presets import get_preset
from coninfer.errors import InputError
from coninfer.evaluate.specs import (
    EVAL_VFM_NORMALIZATION_PRESET,
    ClassSpec,
    ConInferSettings,
    dataset_names,
    datasets_of_table,
    load_dataset_spec,
    paper_results,
)

TABLE1 = ("OpenEarthMap", "LoveDA", "iSAID", "Potsdam", "Vaihingen", "UAVid", "UDD5", "VDD")
TABLE3 = ("WHU_Aerial", "WHU_Sat_II", "Inria", "xBD_pre", "CHN6-CUG", "DeepGlobe", "Massachusetts", "SpaceNet", "WBS-SI")


class TestLookup:
    def test_seventeen_datasets_in_paper_order(self):
        assert dataset_names() == TABLE1 + TABLE3
        assert datasets_of_table("Table1") == TABLE1
        assert datasets_of_table("Table3") == TABLE3

    @pytest.mark.parametrize(("query", "name"), [("loveda", "LoveDA"), ("WHU-SAT-II", "WHU_Sat_II"),
                                                  ("WHUSat.II", "WHU_Sat_II"), ("chn6_cug", "CHN6-CUG"),
                                                  ("UAVid_img", "UAVid"), ("wbs-si", "WBS-SI")])  # fmt: skip
    def test_case_insensitive(self, query, name):
        assert load_dataset_spec(query).name == name

    def test_unknown_name_lists_the_names(self):
        with pytest.raises(InputError, match="unknown dataset 'cityscapes'") as info:
            load_dataset_spec("cityscapes")
        assert "OpenEarthMap" in info.value.hint and "WBS-SI" in info.value.hint


class TestSettings:
    @pytest.mark.parametrize("name", TABLE1 + TABLE3)
    def test_paper_settings(self, name):
        spec = load_dataset_spec(name)
        assert spec.coninfer.gmm_temp == (150.0 if name == "iSAID" else 50.0)
        assert spec.coninfer.attn_lambda == (0.1 if name in ("Vaihingen", "UAVid", "xBD_pre") else 0.6)
        big = name in ("UAVid", "VDD")
        assert spec.coninfer.vfm == ("dinov3_vith16plus_lvd1689m" if big else "dinov3_vitl16_sat493m")
        assert spec.coninfer.logit_scale == 5 and spec.coninfer.batch_size == 50
        assert spec.metric == ("mIoU" if name in TABLE1 else "IoU_foreground")
        assert spec.label_encoding.ignore_index == 255

    def test_label_encodings(self):
        reduce = {n for n in dataset_names() if load_dataset_spec(n).label_encoding.reduce_zero_label}
        assert reduce == {"LoveDA", "Potsdam", "Vaihingen"}
        assert load_dataset_spec("Potsdam").coninfer.bg_index == 5
        assert load_dataset_spec("UDD5").coninfer.bg_index == 4

    def test_class_lines_are_prompt_file_lines(self):
        spec = load_dataset_spec("iSAID")
        assert spec.class_lines[0] == "background,grass,agriculture,water,forest,road,building,barren,urban"
        assert spec.class_lines[2] == "industrial cylindrical storage tank"
        assert len(spec.class_lines) == spec.num_classes == 16
        assert load_dataset_spec("Potsdam").class_lines[0] == "road,parking lot"

    def test_dataclasses_validate_fields(self):
        with pytest.raises(InputError, match="queries"):
            ClassSpec(0, "a", ("x,y",))
        with pytest.raises(InputError, match="prob_thd"):
            ConInferSettings(1.5, 0, 50.0, 0.6, 5.0, "dinov3_vitl16", "sat493m")
        with pytest.raises(InputError, match="vfm_backbone"):
            ConInferSettings(0.5, 0, 50.0, 0.6, 5.0, "resnet50", "sat493m")


class TestVfmNormalization:
    """The eval protocol's VFM statistics come from the presets, SAT-493M for every DINOv3 as in the reference code."""

    def test_every_dataset_gets_the_sat493m_statistics_of_the_presets(self):
        sat = get_preset(EVAL_VFM_NORMALIZATION_PRESET, "vfm").normalization
        assert sat == SAT493M
        for name in dataset_names():
            config = load_dataset_spec(name).coninfer
            assert config.vfm_normalization == sat, name
            assert (config.vfm_mean, config.vfm_std) == (SAT493M.mean, SAT493M.std)

    def test_lvd_vit_h_is_an_explicit_override(self):
        """UAVid's ViT-H+ LVD-1689M was trained on ImageNet statistics; the protocol overrides them."""
        config = load_dataset_spec("UAVid").coninfer
        assert config.vfm_preset == "dinov3-h16plus-lvd"
        assert get_preset(config.vfm_preset, "vfm").normalization == IMAGENET != config.vfm_normalization
        assert load_dataset_spec("Potsdam").coninfer.vfm_preset == "dinov3-l16-sat"

    def test_presets_agree_with_the_recorded_reference(self):
        """datasets.yaml records what the reference code normalises with; the preset must give the same numbers."""
        text = resources.files("coninfer").joinpath("data", "datasets.yaml").read_text(encoding="utf-8")
        reference = yaml.safe_load(text)["defaults"]["dinov3"]
        normalization = load_dataset_spec("LoveDA").coninfer.vfm_normalization
        assert normalization.mean == pytest.approx(reference["normalize_mean"], abs=0)
        assert normalization.std == pytest.approx(reference["normalize_std"], abs=0)


class TestAgainstSharedSpec:
    def test_classes_settings_and_layout_match(self, spec_dir):
        shared = yaml.safe_load((spec_dir / "datasets.yaml").read_text())["datasets"]
        assert tuple(shared) == dataset_names()
        for name, raw in shared.items():
            spec = load_dataset_spec(name)
            assert [list(c.queries) for c in spec.classes] == [c["coninfer_queries"] for c in raw["classes"]], name
            assert spec.class_names == tuple(c["name"] for c in raw["classes"])
            for field, key in (("prob_thd", "prob_thd"), ("bg_index", "bg_idx"), ("attn_lambda", "attn_lambda"),
                               ("gmm_temp", "gmm_temp"), ("logit_scale", "logit_scale")):
                assert getattr(spec.coninfer, field) == raw["coninfer"][key], (name, field)
            assert spec.coninfer.vfm_backbone in raw["coninfer"]["dinov3_backbone"]
            assert spec.coninfer.vfm_weights in raw["coninfer"]["dinov3_backbone"]
            assert spec.label_encoding.reduce_zero_label == raw["label_encoding"]["reduce_zero_label"]
            layout = raw["layout"]["coninfer"]
            assert layout["img_dir"] == f"data/{spec.layout.root}/{spec.layout.img_dir}"
            assert layout["ann_dir"] == f"data/{spec.layout.root}/{spec.layout.ann_dir}"
            assert (spec.layout.img_suffix, spec.layout.ann_suffix) == (raw["suffix"]["img"], raw["suffix"]["ann"])

    def test_paper_results_match(self, spec_dir):
        with open(spec_dir / "paper_results.csv", newline="") as handle:
            rows = [(r["table"], r["method"], r["dataset"], r["metric"], float(r["value"])) for r in csv.DictReader(handle)]
        ours = [(r.table, r.method, r.dataset, r.metric, r.value) for r in paper_results()]
        assert ours == rows


def test_paper_results_filters():
    rows = paper_results("whu_aerial", table="Table3", method="ConInfer")
    assert [(r.metric, r.value) for r in rows] == [("IoU_foreground", 58.54), ("IoU_foreground_gain_vs_MaskCLIP*", 12.78)]
    assert load_dataset_spec("OpenEarthMap").paper_value() == 41.95
    assert load_dataset_spec("OpenEarthMap").paper_value("MaskCLIP* (baseline)") == 32.46
    assert paper_results("average", table="Table1", method="ConInfer")[0].value == 40.78
    with pytest.raises(InputError, match="Table9"):
        paper_results(table="Table9")
