"""Tests of coninfer.encoders.gem: GEM golden parity (fixture G), its resampler, SDPA-only attention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch.utils._python_dispatch import TorchDispatchMode

from coninfer.encoders.clip import DenseCLIP, interpolate_position_embedding
from coninfer.encoders.gem import antialiased_bicubic_weights, gem_forward, gem_position_embedding
from coninfer.encoders.load_clip import load_clip
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.errors import InputError
from coninfer.settings import DenseCLIPSettings

ATOL = 1e-4  # golden README section G


def _settings_from_fixture(spec: dict) -> DenseCLIPSettings:
    """A fixture setting (official GEM argument names) as coninfer settings."""
    return DenseCLIPSettings("gem", spec["ignore_residual"], 0.0, gem_depth=spec["gem_depth"],
                             gem_iterations=spec["ss_attn_iter"], gem_temperature=spec["ss_attn_temp"])


@pytest.fixture(scope="module")
def tiny() -> DenseCLIP:
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pretrain_grid(tiny) -> int:
    return int(tiny.vision_config.image_size) // tiny.patch_size


def _pixels(height: int, width: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[DenseCLIP, dict, torch.Tensor, dict]:
    """Golden fixture G: the fixture-C tower (heads from the config), GEM outputs, the input and the config."""
    config = json.loads((golden_dir / "gem_config.json").read_text())
    dense = load_clip(golden_dir / config["clip_state_dict"], heads=config["heads"])
    outputs = dict(np.load(golden_dir / "gem_outputs.npz", allow_pickle=False))
    pixels = torch.from_numpy((outputs["images_u8"].astype(np.float32) - 128) / 64)
    return dense, outputs, pixels, config


class TestGoldenParity:
    """Fixture G: the official ``gem`` package on the tiny tower of fixture C."""

    def test_every_stored_setting_is_described(self, golden) -> None:
        _, outputs, _, config = golden
        stored = {name.removeprefix("tokens__") for name in outputs if name.startswith("tokens__")}
        assert stored == {spec["key"] for spec in config["settings"]}

    def test_positional_embedding(self, golden) -> None:
        dense, outputs, pixels, _ = golden
        grid_h, grid_w = (size // dense.patch_size for size in pixels.shape[-2:])
        weight = dense.model.vision_model.embeddings.position_embedding.weight.detach()
        table = gem_position_embedding(weight, grid_h, grid_w)
        assert table.shape == outputs["pos_embed_interp"].shape
        np.testing.assert_allclose(table.numpy(), outputs["pos_embed_interp"], atol=1e-6, rtol=0)

    def test_dense_tokens_and_class_rows(self, golden) -> None:
        dense, outputs, pixels, config = golden
        grid_h, grid_w = (size // dense.patch_size for size in pixels.shape[-2:])
        for spec in config["settings"]:
            key = spec["key"]
            tokens, cls_token = dense.dense_tokens(pixels, _settings_from_fixture(spec), output_cls_token=True)
            assert tokens.shape == (pixels.shape[0], grid_h * grid_w, dense.embed_dim), key
            np.testing.assert_allclose(tokens.numpy(), outputs[f"tokens__{key}"], atol=ATOL, rtol=0, err_msg=key)
            np.testing.assert_allclose(cls_token.numpy(), outputs[f"cls__{key}"], atol=ATOL, rtol=0, err_msg=key)

    def test_original_path(self, golden) -> None:
        dense, outputs, pixels, config = golden
        original = gem_forward(dense, pixels, _settings_from_fixture(config["settings"][0])).original
        np.testing.assert_allclose(original.numpy(), outputs["ori_tokens"], atol=ATOL, rtol=0)


class TestResampler:
    @pytest.mark.parametrize(("size_in", "size_out"), [(14, 28), (14, 5), (14, 9), (14, 20), (7, 3), (5, 13)])
    def test_matches_torch_antialiased_bicubic(self, size_in: int, size_out: int) -> None:
        table = torch.randn(1, 3, size_in, size_in, generator=torch.Generator().manual_seed(size_out),
                           dtype=torch.float64)
        expected = F.interpolate(table, size=(size_out, size_out), mode="bicubic", antialias=True,
                                 align_corners=False)
        weights = antialiased_bicubic_weights(size_in, size_out)
        torch.testing.assert_close(weights @ table @ weights.T, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(size_out, dtype=torch.float64))

    def test_identity_at_pretraining_grid(self, tiny, pretrain_grid: int) -> None:
        torch.testing.assert_close(antialiased_bicubic_weights(pretrain_grid, pretrain_grid),
                                   torch.eye(pretrain_grid, dtype=torch.float64), atol=1e-15, rtol=0)
        weight = tiny.model.vision_model.embeddings.position_embedding.weight.detach()
        assert gem_position_embedding(weight, pretrain_grid, pretrain_grid) is weight

    def test_non_square_grid_and_class_position(self, tiny, pretrain_grid: int) -> None:
        weight = tiny.model.vision_model.embeddings.position_embedding.weight.detach()
        table = gem_position_embedding(weight, 4, 6)
        dim = weight.shape[1]
        grid = weight[1:].reshape(1, pretrain_grid, pretrain_grid, dim).permute(0, 3, 1, 2)  # -> (1, D, g, g)
        expected = F.interpolate(grid, size=(4, 6), mode="bicubic", antialias=True, align_corners=False)
        torch.testing.assert_close(table[1:], expected.permute(0, 2, 3, 1).reshape(24, dim), atol=1e-5, rtol=0)
        torch.testing.assert_close(table[0], weight[0], atol=0, rtol=0)

    def test_differs_from_plus_point_one_rule(self, tiny) -> None:
        weight = tiny.model.vision_model.embeddings.position_embedding.weight.detach()
        assert (gem_position_embedding(weight, 28, 28) - interpolate_position_embedding(weight, 28, 28)).abs().max() > 1e-3


def _explicit_gem(dense: DenseCLIP, pixels: torch.Tensor, settings: DenseCLIPSettings):
    """Test oracle written from golden README G with explicit (B, n, L, L) maps: (gem, original), (B, L, E)."""
    vision = dense.model.vision_model
    embeddings = vision.embeddings
    grid_h, grid_w = (size // dense.patch_size for size in pixels.shape[-2:])
    positions = embeddings.position_embedding.weight
    grid = math.isqrt(positions.shape[0] - 1)
    table = positions[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (g*g, D) -> (1, D, g, g)
    if (grid_h, grid_w) != (grid, grid):
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", antialias=True, align_corners=False)
    positions = torch.cat([positions[:1], table.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = vision.pre_layrnorm(torch.cat([embeddings.class_embedding.expand(len(pixels), 1, -1), patches], 1) + positions)
    layers = vision.encoder.layers
    first = len(layers) - (settings.gem_depth - 1)

    def heads(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(*t.shape[:2], n, -1).transpose(1, 2)

    def merge(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).flatten(2)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    gem = x
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        hh = layer.layer_norm1(x)
        q, k, v = (heads(proj(hh), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        scale = q.shape[-1] ** -0.5
        if index == first:
            gem = x
        if index >= first:
            beta = settings.gem_temperature
            if beta is None:
                beta = scale * hh.norm(dim=-1).mean(dim=-1)[:, None, None, None]
            outs = []
            for u in (v, k, q):
                a = u
                for _ in range(settings.gem_iterations):
                    a = unit(a)
                    a = torch.softmax(beta * a @ a.transpose(-1, -2), dim=-1) @ a
                a = unit(a)
                outs.append(torch.softmax(beta * a @ a.transpose(-1, -2), dim=-1) @ v)
            o = attn.out_proj(merge((outs[0] + outs[1] + outs[2]) / 3))
            gem = o if settings.ignore_residual else gem + o
        x = x + attn.out_proj(merge(torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v))
        x = x + layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(x))))
    return tuple(dense.model.visual_projection(vision.post_layernorm(t)) for t in (gem, x))


ORACLE_SETTINGS = [
    dict(gem_depth=7, gem_iterations=1, gem_temperature=None, ignore_residual=False),
    dict(gem_depth=7, gem_iterations=1, gem_temperature=None, ignore_residual=True),
    dict(gem_depth=4, gem_iterations=3, gem_temperature=5.0, ignore_residual=False),
    dict(gem_depth=2, gem_iterations=2, gem_temperature=None, ignore_residual=True),
    dict(gem_depth=13, gem_iterations=1, gem_temperature=2.0, ignore_residual=False),
]


class TestAgainstExplicitMatrices:
    @pytest.mark.parametrize("values", ORACLE_SETTINGS, ids=lambda v: "d{gem_depth}_it{gem_iterations}".format(**v))
    @pytest.mark.parametrize("size", [(64, 96), (288, 224)], ids=["shrink", "grow"])
    def test_same_as_oracle(self, tiny, values: dict, size: tuple[int, int]) -> None:
        settings = DenseCLIPSettings.for_variant("gem", **values)
        pixels = _pixels(*size)
        result = gem_forward(tiny, pixels, settings)
        with torch.no_grad():
            gem, original = _explicit_gem(tiny, pixels, settings)
        torch.testing.assert_close(result.gem, gem, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(result.original, original, atol=2e-5, rtol=1e-5)


class TestThroughDenseCLIP:
    def test_for_variant(self) -> None:
        settings = DenseCLIPSettings.for_variant("GEM")
        assert (settings.variant, settings.ignore_residual, settings.gem_depth, settings.gem_iterations,
                settings.gem_temperature) == ("gem", False, 7, 1, None)

    def test_dense_features_non_pretraining_grid(self, tiny) -> None:
        pixels = _pixels(64, 96)
        settings = DenseCLIPSettings.for_variant("gem")
        features = tiny.dense_features(pixels, settings)
        grid = (64 // tiny.patch_size) * (96 // tiny.patch_size)
        assert features.shape == (2, grid, tiny.embed_dim) and features.dtype == torch.float32
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, grid))
        expected = F.normalize(gem_forward(tiny, pixels, settings).gem[:, 1:], dim=-1)
        torch.testing.assert_close(features, expected, atol=0, rtol=0)
        surgery = tiny.dense_features(pixels, DenseCLIPSettings.for_variant("segearth"))
        assert not torch.allclose(features, surgery, atol=1e-3)

    def test_dense_features_pretraining_grid(self, tiny, pretrain_grid: int) -> None:
        side = pretrain_grid * tiny.patch_size
        pixels = _pixels(side, side, seed=5)
        settings = DenseCLIPSettings.for_variant("gem")
        features = tiny.dense_features(pixels, settings)
        assert features.shape == (2, pretrain_grid**2, tiny.embed_dim)
        with torch.no_grad():
            gem, _ = _explicit_gem(tiny, pixels, settings)
        torch.testing.assert_close(features, F.normalize(gem[:, 1:], dim=-1), atol=2e-5, rtol=1e-5)
        # at the pretraining grid no resampling happens, so the original path is plain (vanilla) CLIP
        vanilla = tiny.dense_tokens(pixels, DenseCLIPSettings.for_variant("vanilla"))
        torch.testing.assert_close(gem_forward(tiny, pixels, settings).original[:, 1:], vanilla,
                                   atol=2e-5, rtol=1e-5)

    def test_attn_lambda_is_ignored(self, tiny) -> None:
        pixels = _pixels(64, 96)
        plain = tiny.dense_tokens(pixels, DenseCLIPSettings("gem", False, 0.0))
        torch.testing.assert_close(tiny.dense_tokens(pixels, DenseCLIPSettings("gem", False, 0.6)), plain,
                                   atol=0, rtol=0)

    def test_settings_change_the_output(self, tiny) -> None:
        pixels = _pixels(64, 96)
        base = tiny.dense_tokens(pixels, DenseCLIPSettings.for_variant("gem"))
        for change in ({"gem_depth": 4}, {"gem_iterations": 2}, {"gem_temperature": 3.0},
                       {"ignore_residual": True}):
            other = tiny.dense_tokens(pixels, DenseCLIPSettings.for_variant("gem", **change))
            assert not torch.allclose(base, other, atol=1e-3), change

    def test_bad_depth_and_input(self, tiny) -> None:
        too_deep = tiny.num_layers + 2
        with pytest.raises(InputError, match="gem_depth"):
            tiny.dense_tokens(_pixels(32, 32), DenseCLIPSettings.for_variant("gem", gem_depth=too_deep))
        with pytest.raises(InputError, match="multiple of the patch size"):
            tiny.dense_tokens(torch.zeros(1, 3, 30, 32), DenseCLIPSettings.for_variant("gem"))
        with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
            tiny.dense_tokens(torch.zeros(3, 32, 32), DenseCLIPSettings.for_variant("gem"))


class _SquareSpy(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else [result]
        self.ops.append((str(func), [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)]))
        return result


class TestMemoryDiscipline:
    def test_no_token_by_token_matrix(self, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only SDPA attends: no softmax call, no (L, L) tensor, and the expected number of SDPA calls."""
        real_sdpa = F.scaled_dot_product_attention
        calls = []

        def counting_sdpa(*args, **kwargs):
            calls.append(kwargs.get("scale"))
            return real_sdpa(*args, **kwargs)

        def forbidden(*args, **kwargs):
            raise AssertionError("GEM must not call softmax itself")

        monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
        for owner in (torch, F, torch.Tensor):
            monkeypatch.setattr(owner, "softmax", forbidden)
        settings = DenseCLIPSettings.for_variant("gem", gem_depth=4, gem_iterations=2)
        pixels = _pixels(96, 128)
        length = 1 + (96 // tiny.patch_size) * (128 // tiny.patch_size)
        with _SquareSpy() as spy:
            tiny.dense_tokens(pixels, settings)
        square = [op for op, shapes in spy.ops if any(shape[-2:] == (length, length) for shape in shapes)]
        assert not square, square
        expected = tiny.num_layers + (settings.gem_depth - 1) * 3 * (settings.gem_iterations + 1)
        assert len(calls) == expected and all(scale is not None for scale in calls)
