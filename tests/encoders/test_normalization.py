"""Pixel statistics: values, names, overrides, and what json files record (nothing is guessed from names)."""

from __future__ import annotations

import pytest

from coninfer.encoders.normalization import (
    IMAGENET,
    OPENAI_CLIP,
    SAT493M,
    Normalization,
    normalization_from_mapping,
    resolve_normalization,
)
from coninfer.errors import InputError


class TestNormalization:
    def test_values(self) -> None:
        assert SAT493M.mean == (0.430, 0.411, 0.296) and SAT493M.std == (0.213, 0.156, 0.143)
        assert IMAGENET.mean == (0.485, 0.456, 0.406) and IMAGENET.std == (0.229, 0.224, 0.225)
        assert OPENAI_CLIP.mean == (0.48145466, 0.4578275, 0.40821073)
        assert OPENAI_CLIP.std == (0.26862954, 0.26130258, 0.27577711)

    @pytest.mark.parametrize(("mean", "std", "field"), [((0.5, 0.5), (0.2, 0.2, 0.2), "mean"),
                                                         ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), "std"),
                                                         ((120.0, 110.0, 100.0), (0.2, 0.2, 0.2), "mean")])
    def test_bad_values_name_the_field(self, mean, std, field) -> None:
        with pytest.raises(InputError, match=f"Normalization.{field}"):
            Normalization(mean, std)

    def test_dict_round_trip(self) -> None:
        assert normalization_from_mapping(SAT493M.as_dict()) == SAT493M


class TestResolve:
    def test_none_is_the_default_whatever_the_name(self) -> None:
        assert resolve_normalization(None, IMAGENET) is IMAGENET
        assert resolve_normalization(None, SAT493M) is SAT493M

    def test_names_and_objects(self) -> None:
        assert resolve_normalization("imagenet", SAT493M) == IMAGENET
        assert resolve_normalization("SAT493M", IMAGENET) == SAT493M
        assert resolve_normalization("openai_clip", IMAGENET) == OPENAI_CLIP
        custom = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        assert resolve_normalization(custom, SAT493M) is custom
        with pytest.raises(InputError, match="unknown normalization"):
            resolve_normalization("coco", IMAGENET)


class TestFromMapping:
    def test_timm_pretrained_cfg(self) -> None:
        cfg = {"mean": [0.430, 0.411, 0.296], "std": [0.213, 0.156, 0.143], "tag": "sat493m"}
        assert normalization_from_mapping(cfg) == SAT493M

    def test_transformers_preprocessor(self) -> None:
        processor = {"image_mean": list(IMAGENET.mean), "image_std": list(IMAGENET.std), "do_normalize": True}
        assert normalization_from_mapping(processor).mean == IMAGENET.mean
        assert normalization_from_mapping({**processor, "do_normalize": False}) is None
        del processor["do_normalize"]  # transformers' processors normalise unless told not to
        assert normalization_from_mapping(processor).std == IMAGENET.std

    def test_nothing_recorded(self) -> None:
        assert normalization_from_mapping({"architecture": "vit_large_patch16_dinov3"}) is None
        assert normalization_from_mapping("sat") is None
