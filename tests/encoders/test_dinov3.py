"""DenseVFM: dense patch features of DINOv3/DINOv2 (tiny random models; golden parity is in test_load_vfm)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from coninfer.encoders.dinov3 import (
    IMAGENET,
    SAT493M,
    DenseVFM,
    Normalization,
    build_tiny_dinov2,
    build_tiny_dinov3,
    normalization_for,
    resolve_dtype,
    resolve_normalization,
)
from coninfer.errors import InputError


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


class TestNormalization:
    def test_sat_chosen_from_name(self) -> None:
        assert normalization_for("timm/vit_large_patch16_dinov3.sat493m") == SAT493M
        assert normalization_for("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth") == SAT493M
        assert normalization_for("timm/vit_huge_plus_patch16_dinov3.lvd1689m") == IMAGENET
        assert normalization_for("facebook/dinov2-large") == IMAGENET
        assert normalization_for("dinov3-l16-sat") == SAT493M
        assert normalization_for("/data/satellite/dinov3-vitl16-pretrain-lvd1689m") == IMAGENET
        assert normalization_for("/data/sat/dinov3-vitl16-pretrain-lvd1689m/") == IMAGENET
        assert normalization_for("/data/models/dinov3-vitl16-pretrain-sat493m") == SAT493M
        assert normalization_for("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth") == SAT493M

    def test_values(self) -> None:
        assert SAT493M.mean == (0.430, 0.411, 0.296) and SAT493M.std == (0.213, 0.156, 0.143)
        assert IMAGENET.mean == (0.485, 0.456, 0.406) and IMAGENET.std == (0.229, 0.224, 0.225)

    def test_resolve_override(self) -> None:
        assert resolve_normalization("imagenet", "x.sat493m") == IMAGENET
        assert resolve_normalization("SAT493M", "lvd") == SAT493M
        custom = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        assert resolve_normalization(custom, "sat") is custom
        with pytest.raises(InputError, match="unknown normalization"):
            resolve_normalization("coco", "x")

    @pytest.mark.parametrize(("mean", "std", "field"), [((0.5, 0.5), (0.2, 0.2, 0.2), "mean"),
                                                         ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), "std"),
                                                         ((120.0, 110.0, 100.0), (0.2, 0.2, 0.2), "mean")])
    def test_bad_values_name_the_field(self, mean, std, field) -> None:
        with pytest.raises(InputError, match=f"Normalization.{field}"):
            Normalization(mean, std)


class TestDenseVFM:
    def test_attributes(self) -> None:
        vfm = build_tiny_dinov3(seed=0)
        assert (vfm.patch_size, vfm.feature_dim, vfm.num_prefix_tokens) == (16, 64, 5)
        assert vfm.image_mean == IMAGENET.mean and vfm.image_std == IMAGENET.std
        assert "tiny-random" in vfm.name and vfm.is_dinov3

    def test_dense_features_shape_and_norm(self) -> None:
        vfm = build_tiny_dinov3(seed=0)
        features = vfm.dense_features(_images(2, 64, 96))
        assert features.shape == (2, 4 * 6, 64) and features.dtype == torch.float32
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, 24))

    def test_dense_features_are_normalised_patch_tokens(self) -> None:
        vfm = build_tiny_dinov3(seed=3, num_hidden_layers=3, gated_mlp=True)
        images = _images(1, 32, 48)
        tokens = vfm.model(pixel_values=images).last_hidden_state  # [cls, reg x4, patches]
        expected = F.normalize(tokens[:, 5:], dim=-1)
        torch.testing.assert_close(vfm.dense_features(images), expected)
        torch.testing.assert_close(vfm.patch_tokens(images), tokens[:, 5:])

    def test_non_square_input(self) -> None:
        vfm = build_tiny_dinov3(seed=1)
        features = vfm.dense_features(_images(1, 448, 320))
        assert features.shape == (1, 28 * 20, 64)
        assert vfm.grid_size(448, 320) == (28, 20)
        assert torch.isfinite(features).all()

    @pytest.mark.parametrize("shape", [(1, 3, 50, 64), (1, 3, 64, 0), (1, 4, 64, 64), (3, 64, 64)])
    def test_bad_input_shape(self, shape) -> None:
        vfm = build_tiny_dinov3(seed=0)
        with pytest.raises(InputError):
            vfm.dense_features(torch.zeros(shape))

    def test_seeded(self) -> None:
        images = _images(1, 32, 32)
        first = build_tiny_dinov3(seed=5).dense_features(images)
        torch.testing.assert_close(build_tiny_dinov3(seed=5).dense_features(images), first, rtol=0, atol=0)
        assert (build_tiny_dinov3(seed=6).dense_features(images) - first).abs().max() > 0.1

    def test_rope_periods_override_changes_outputs(self) -> None:
        vfm = build_tiny_dinov3(seed=2)
        images = _images(1, 64, 64)
        before = vfm.patch_tokens(images)
        default = vfm.rope_periods
        torch.testing.assert_close(default, 100.0 ** (torch.arange(4) / 4.0))
        rounded = default.to(torch.bfloat16).float() * 1.01
        vfm.set_rope_periods(rounded)
        torch.testing.assert_close(vfm.rope_periods, rounded, rtol=0, atol=0)
        torch.testing.assert_close(vfm.model.rope_embeddings.inv_freq, 1.0 / rounded)
        assert (vfm.patch_tokens(images) - before).abs().max() > 1e-3
        with pytest.raises(InputError, match="shape"):
            vfm.set_rope_periods(torch.ones(3))
        with pytest.raises(InputError, match="positive"):
            vfm.set_rope_periods(torch.tensor([1.0, 2.0, 0.0, 4.0]))

    def test_rope_stays_float32_in_half_precision(self) -> None:
        vfm = build_tiny_dinov3(seed=4)
        images = _images(1, 48, 48)
        vfm.set_rope_periods(vfm.rope_periods * 1.001)
        reference = vfm.dense_features(images)
        vfm.to(torch.bfloat16)  # casts every float buffer, inv_freq included
        low = vfm.dense_features(images)
        assert vfm.model.rope_embeddings.inv_freq.dtype == torch.float32
        torch.testing.assert_close(vfm.model.rope_embeddings.inv_freq, 1.0 / vfm.rope_periods)
        assert low.dtype == torch.float32
        assert F.cosine_similarity(low, reference, dim=-1).min() > 0.99

    def test_to_runtime_cpu(self) -> None:
        vfm = build_tiny_dinov3(seed=0).to_runtime("cpu")
        assert vfm.dtype == torch.float32 and vfm.device.type == "cpu"

    def test_rejects_other_models(self) -> None:
        module = torch.nn.Linear(2, 2)
        module.config = types.SimpleNamespace(model_type="clip_vision_model")
        with pytest.raises(InputError, match="clip_vision_model"):
            DenseVFM(module, name="clip")


class TestResolveDtype:
    def test_defaults(self) -> None:
        assert resolve_dtype(torch.device("cpu"), None) == torch.float32
        assert resolve_dtype(torch.device("cuda"), None) == torch.float16
        assert resolve_dtype(torch.device("cuda"), "bf16") == torch.bfloat16

    def test_half_on_cpu_refused(self) -> None:
        with pytest.raises(InputError, match="float32 on the CPU"):
            resolve_dtype(torch.device("cpu"), torch.float16)
        with pytest.raises(InputError, match="unknown dtype"):
            resolve_dtype(torch.device("cpu"), "int8")


class TestDinov2:
    @pytest.mark.parametrize("registers", [0, 4])
    def test_patch_tokens_skip_cls_and_registers(self, registers: int) -> None:
        vfm = build_tiny_dinov2(seed=0, num_register_tokens=registers)
        assert (vfm.patch_size, vfm.num_prefix_tokens, vfm.rope_periods) == (14, 1 + registers, None)
        images = _images(2, 56, 84)
        tokens = vfm.model(pixel_values=images).last_hidden_state
        features = vfm.dense_features(images)
        assert features.shape == (2, 4 * 6, 64)
        torch.testing.assert_close(features, F.normalize(tokens[:, 1 + registers :], dim=-1))

    def test_no_rope_override(self) -> None:
        with pytest.raises(InputError, match="DINOv3 only"):
            build_tiny_dinov2().set_rope_periods(torch.ones(4))
