"""DenseVFM: dense patch features of DINOv3/DINOv2/other ViTs (tiny random models; golden parity: test_load_vfm)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from coninfer.encoders.dinov3 import DenseVFM, resolve_dtype
from coninfer.encoders.normalization import IMAGENET
from coninfer.encoders.tiny import build_tiny_dinov2, build_tiny_dinov3
from coninfer.errors import InputError


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


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

    def test_rejects_models_without_a_patch_grid(self) -> None:
        module = torch.nn.Linear(2, 2)
        module.config = types.SimpleNamespace(model_type="bert", hidden_size=2)
        with pytest.raises(InputError, match="'bert' has no patch_size"):
            DenseVFM(module, name="text")

    def test_fingerprint(self) -> None:
        assert build_tiny_dinov3(seed=7).fingerprint == "tiny-random:7"
        assert DenseVFM(build_tiny_dinov3().model, name="mine").fingerprint == "unrecorded:mine"


class TestOtherViTs:
    """Any transformers ViT whose last_hidden_state is [cls, registers, patches] works, not only DINO."""

    def _vit(self):
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           patch_size=8, image_size=32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ViTModel(config, add_pooling_layer=False).eval()

    def test_plain_vit(self) -> None:
        model = self._vit()
        vfm = DenseVFM(model, name="vit")
        assert (vfm.patch_size, vfm.feature_dim, vfm.num_prefix_tokens, vfm.rope_periods) == (8, 32, 1, None)
        images = _images(2, 48, 64)  # not the 32-px pretraining size: the position table is interpolated
        tokens = model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        features = vfm.dense_features(images)
        assert features.shape == (2, 6 * 8, 32)
        torch.testing.assert_close(features, F.normalize(tokens[:, 1:], dim=-1))


class TestResolveDtype:
    def test_defaults(self) -> None:
        assert resolve_dtype(torch.device("cpu"), None) == torch.float32
        assert resolve_dtype(torch.device("cuda"), None) == torch.float16
        assert resolve_dtype(torch.device("cuda"), "bf16") == torch.bfloat16

    def test_half_on_cpu_refused(self) -> None:
        with pytest.raises(InputError, match="float16 on the CPU is not supported"):
            resolve_dtype(torch.device("cpu"), torch.float16)
        assert resolve_dtype(torch.device("cpu"), torch.bfloat16) == torch.bfloat16  # checked native upstream
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
