"""Tests of coninfer.encoders.clip: dense CLIP variants, golden parity (fixture C), SDPA vs explicit attention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from coninfer.encoders.clip import (
    CLIP_MEAN,
    CLIP_STD,
    DenseCLIP,
    check_tokenizer,
    interpolate_position_embedding,
)
from coninfer.encoders.load_clip import load_clip
from coninfer.encoders.normalization import OPENAI_CLIP
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.errors import InputError, ModelLoadError
from coninfer.prompts import load_templates
from coninfer.settings import VARIANTS, DenseCLIPSettings
from exporters import REFERENCE_VARIANTS, reference_dense_tokens, to_open_clip_state_dict

GOLDEN_KEYS = [
    "vanilla_res", "maskclip_res", "maskclip_nores", "sclip_res", "clearclip_nores", "segearth_nores_l0",
    "segearth_nores_l0.6", "segearth_nores_l0.1", "clearclip_nores_l0.6", "sclip_res_l0.6", "segearth_nores_l0.6_cls",
]


@pytest.fixture(scope="module")
def tiny() -> DenseCLIP:
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """(2, 3, 64, 96): a non-square 4 x 6 grid, so the positional embedding is interpolated."""
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))


class TestDenseCLIPSettings:
    def test_defaults_are_the_paper_config(self) -> None:
        assert DenseCLIPSettings() == DenseCLIPSettings("segearth", True, 0.6)

    @pytest.mark.parametrize(("variant", "ignore_residual", "attn_lambda"), [
        ("vanilla", False, 0.0), ("maskclip", False, 0.0), ("sclip", False, 0.0), ("clearclip", True, 0.0),
        ("segearth", True, 0.6),
    ])
    def test_for_variant_table2(self, variant: str, ignore_residual: bool, attn_lambda: float) -> None:
        settings = DenseCLIPSettings.for_variant(variant.upper())
        assert (settings.variant, settings.ignore_residual, settings.attn_lambda) == (variant, ignore_residual,
                                                                                       attn_lambda)

    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"variant": "unet"}, "variant"), ({"attn_lambda": 1.5}, "--attn-lambda"),
        ({"attn_lambda": float("nan")}, "--attn-lambda"), ({"ignore_residual": "yes"}, "ignore_residual"),
    ])
    def test_invalid_fields_named(self, kwargs: dict, field: str) -> None:
        with pytest.raises(InputError, match=field):
            DenseCLIPSettings(**kwargs)
        with pytest.raises(InputError, match="variant"):
            DenseCLIPSettings.for_variant("unet")


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[DenseCLIP, dict, torch.Tensor, dict]:
    """Golden fixture C: the visual tower (open_clip names; heads from its config), its outputs, input, settings."""
    config = json.loads((golden_dir / "clip_config.json").read_text())
    dense = load_clip(golden_dir / "clip_visual_state_dict.safetensors", heads=config["heads"])
    outputs = dict(np.load(golden_dir / "clip_dense_outputs.npz", allow_pickle=False))
    pixels = torch.from_numpy((outputs["images_u8"].astype(np.float32) - 128) / 64)
    return dense, outputs, pixels, {s["key"]: s for s in config["settings"]}


class TestGoldenParity:
    """Fixture C of the golden set: official open_clip dense forward on a tiny random visual tower."""

    def test_model_shape(self, golden, golden_dir: Path) -> None:
        config = json.loads((golden_dir / "clip_config.json").read_text())
        dense = golden[0]
        assert (dense.patch_size, dense.embed_dim, dense.num_layers, dense.has_text) == (
            config["patch_size"], config["output_dim"], config["layers"], False)

    def test_positional_embedding_interpolation(self, golden) -> None:
        dense, outputs, pixels, _ = golden
        grid_h, grid_w = (side // dense.patch_size for side in pixels.shape[2:])  # grid from image and patch size
        np.testing.assert_allclose(dense.position_embedding(grid_h, grid_w).numpy(), outputs["pos_embed_interp"],
                                   atol=1e-5)

    @pytest.mark.parametrize("key", GOLDEN_KEYS)
    def test_dense_tokens(self, golden, key: str) -> None:
        dense, outputs, pixels, settings_by_key = golden
        spec = settings_by_key[key]
        settings = DenseCLIPSettings(spec["model_type"].lower(), spec["ignore_residual"], spec["attn_lambda"])
        result = dense.dense_tokens(pixels, settings, output_cls_token=spec["output_cls_token"])
        if spec["output_cls_token"]:
            tokens, cls_token = result
            np.testing.assert_allclose(cls_token.numpy(), outputs[f"cls__{key}"], atol=1e-4, rtol=0)
            key = key.removesuffix("_cls")
        else:
            tokens = result
        grid_h, grid_w = (side // dense.patch_size for side in pixels.shape[2:])
        assert tokens.shape == (pixels.shape[0], grid_h * grid_w, dense.embed_dim)
        np.testing.assert_allclose(tokens.numpy(), outputs[f"tokens__{key}"], atol=1e-4, rtol=0)


class TestAttentionPaths:
    @pytest.mark.parametrize("variant", REFERENCE_VARIANTS)
    @pytest.mark.parametrize("attn_lambda", [0.0, 0.1, 0.6, 1.0])
    @pytest.mark.parametrize("ignore_residual", [True, False])
    def test_sdpa_matches_explicit_matrices(self, tiny, pixels, variant: str, attn_lambda: float,
                                            ignore_residual: bool) -> None:
        settings = DenseCLIPSettings(variant, ignore_residual, attn_lambda)
        fast_tokens, fast_cls = tiny.dense_tokens(pixels, settings, output_cls_token=True)
        slow_tokens, slow_cls = reference_dense_tokens(tiny, pixels, settings, output_cls_token=True)
        torch.testing.assert_close(fast_tokens, slow_tokens, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fast_cls, slow_cls, atol=2e-5, rtol=1e-5)

    def test_variants_differ(self, tiny, pixels) -> None:
        outputs = {v: tiny.dense_tokens(pixels, DenseCLIPSettings(v, True, 0.0)) for v in VARIANTS}
        for first in VARIANTS:
            for second in VARIANTS:
                if first < second:
                    assert not torch.allclose(outputs[first], outputs[second], atol=1e-3), (first, second)

    def test_vanilla_equals_transformers_forward(self, tiny) -> None:
        pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        tokens = tiny.dense_tokens(pixels, DenseCLIPSettings("vanilla", False, 0.0))
        with torch.no_grad():
            hidden = tiny.model.vision_model(pixel_values=pixels).last_hidden_state
            expected = tiny.model.visual_projection(tiny.model.vision_model.post_layernorm(hidden))[:, 1:]
        torch.testing.assert_close(tokens, expected, atol=2e-5, rtol=1e-5)


class TestDenseCLIP:
    def test_attributes(self, tiny) -> None:
        assert (tiny.patch_size, tiny.embed_dim, tiny.num_layers) == (16, 32, 12)
        assert tiny.image_mean == CLIP_MEAN and tiny.image_std == CLIP_STD
        assert tiny.name == "tiny-random-clip-seed0" and tiny.has_text
        assert tiny.settings == DenseCLIPSettings()

    def test_any_multiple_of_patch_size(self, tiny) -> None:
        tokens = tiny.dense_tokens(torch.zeros(1, 3, 32, 80))
        assert tokens.shape == (1, 2 * 5, 32)
        with pytest.raises(InputError, match="multiple of the patch size"):
            tiny.dense_tokens(torch.zeros(1, 3, 30, 32))
        with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
            tiny.dense_tokens(torch.zeros(3, 32, 32))

    def test_position_embedding_cache_and_identity(self, tiny) -> None:
        first = tiny.position_embedding(4, 6)
        assert tiny.position_embedding(4, 6) is first
        assert first.shape == (1 + 24, 64)
        weight = tiny.model.vision_model.embeddings.position_embedding.weight
        assert torch.equal(tiny.position_embedding(14, 14), weight)
        torch.testing.assert_close(first, interpolate_position_embedding(weight.detach(), 4, 6))

    def test_plus_point_one_rule_changes_sampling(self, tiny) -> None:
        weight = tiny.model.vision_model.embeddings.position_embedding.weight.detach()
        table = weight[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
        plain = torch.nn.functional.interpolate(table, size=(28, 28), mode="bicubic", align_corners=False)
        plain = plain.permute(0, 2, 3, 1).reshape(784, 64)
        ours = interpolate_position_embedding(weight, 28, 28)[1:]
        assert (ours - plain).abs().max() > 1e-3
        torch.testing.assert_close(interpolate_position_embedding(weight, 28, 28)[0], weight[0])

    def test_dense_features_and_logits(self, tiny, pixels) -> None:
        features = tiny.dense_features(pixels)
        assert features.shape == (2, 24, 32) and features.dtype == torch.float32
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, 24))
        queries = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
        logits = tiny.dense_logits(pixels, queries)
        assert logits.shape == (2, 24, 5)
        torch.testing.assert_close(logits, features @ torch.nn.functional.normalize(queries, dim=-1).T)
        assert logits.abs().max() <= 1 + 1e-5
        with pytest.raises(InputError, match="query_embeddings"):
            tiny.dense_logits(pixels, torch.zeros(5, 16))

    def test_fusion_needs_twelve_blocks(self) -> None:
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  patch_size=16, image_size=32, projection_dim=8)
        shallow = DenseCLIP(CLIPVisionModelWithProjection(config), name="shallow")
        assert shallow.dense_tokens(torch.zeros(1, 3, 32, 32), DenseCLIPSettings("segearth", True, 0.0)).shape == (
            1, 4, 8)
        with pytest.raises(InputError, match="attn_lambda"):
            shallow.dense_tokens(torch.zeros(1, 3, 32, 32))
        with pytest.raises(ModelLoadError, match="no text encoder"):
            shallow.encode_text(["a photo"])

    def test_bfloat16_close_to_float32(self, tiny, pixels) -> None:
        reference = tiny.dense_features(pixels)
        low = build_tiny_clip(seed=0).to(torch.bfloat16)
        features = low.dense_features(pixels)
        assert features.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(features, reference, dim=-1).min() > 0.95

    def test_normalization_and_fingerprint(self, tiny) -> None:
        assert tiny.normalization == OPENAI_CLIP and (tiny.image_mean, tiny.image_std) == (CLIP_MEAN, CLIP_STD)
        assert tiny.fingerprint == "tiny-random:0" and build_tiny_clip(seed=3).fingerprint == "tiny-random:3"

    def test_tiny_is_seeded(self, tiny, pixels) -> None:
        same = build_tiny_clip(seed=0)
        other = build_tiny_clip(seed=1)
        assert torch.equal(same.dense_tokens(pixels), tiny.dense_tokens(pixels))
        assert not torch.allclose(other.dense_tokens(pixels), tiny.dense_tokens(pixels))


class TestText:
    def test_encode_text(self, tiny) -> None:
        embeddings = tiny.encode_text(["a photo of a building.", "road", "water " * 100])
        assert embeddings.shape == (3, 32) and embeddings.dtype == torch.float32
        single = tiny.encode_text(["road"])
        torch.testing.assert_close(single[0], embeddings[1], atol=1e-5, rtol=1e-5)  # padding does not leak

    def test_encode_queries_uses_templates_and_cache(self, tiny, tmp_path: Path) -> None:
        embeddings = tiny.encode_queries(["building", "road"], cache_dir=tmp_path)
        assert embeddings.shape == (2, 32)
        texts = [t.replace("{}", "road") for t in load_templates()]
        raw = torch.nn.functional.normalize(tiny.encode_text(texts), dim=-1).mean(0)
        torch.testing.assert_close(embeddings[1], torch.nn.functional.normalize(raw, dim=0), atol=1e-5, rtol=1e-5)
        assert list((tmp_path / "text_embeddings").glob("*.safetensors"))
        assert tiny.text_model_key.startswith("tiny-random-clip-seed0|float32|")

    def test_cache_key_tracks_what_changes_text_embeddings(self, tiny, tmp_path: Path) -> None:
        """Same name, same weights but another activation or head count must not reuse cached embeddings."""
        checkpoint = tmp_path / "shared-name.safetensors"
        save_file(to_open_clip_state_dict(tiny), str(checkpoint))
        tokenizer = tmp_path / "tokenizer"
        tiny.tokenizer.save_pretrained(str(tokenizer))
        variants = [load_clip(checkpoint, heads=4, text_heads=4, tokenizer=tokenizer),
                    load_clip(checkpoint, heads=4, text_heads=4, tokenizer=tokenizer, activation="gelu"),
                    load_clip(checkpoint, heads=4, text_heads=2, tokenizer=tokenizer)]
        assert len({model.text_model_key for model in variants}) == 3
        cache = tmp_path / "cache"
        for model in variants:
            cached = model.encode_queries(["road", "tree"], cache_dir=cache)
            fresh = model.encode_queries(["road", "tree"], use_cache=False)
            torch.testing.assert_close(cached, fresh, rtol=0, atol=0)

    def test_cache_key_sees_any_text_weight(self, tiny) -> None:
        other = build_tiny_clip(seed=0)
        with torch.no_grad():
            other.model.text_model.encoder.layers[1].mlp.fc2.weight.mul_(1.5)  # e.g. a merged text-tower adapter
        assert other.text_model_key != tiny.text_model_key

    def test_truncated_text_is_reported(self, tiny, caplog: pytest.LogCaptureFixture) -> None:
        long_name = "very " * 90 + "long building"
        with caplog.at_level("WARNING", logger="coninfer.encoders.clip"):
            tiny.encode_text([long_name, "road"])
        assert "77" in caplog.text and "very very" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING", logger="coninfer.encoders.clip"):
            tiny.encode_text(["road"])
        assert caplog.text == ""

    def test_truncation_warning_of_a_huge_name_is_one_short_line(self, tiny, caplog: pytest.LogCaptureFixture) -> None:
        huge_name = "x" * 2500 + "\n" + "y" * 2499  # 5,000 characters, a newline inside
        with caplog.at_level("WARNING", logger="coninfer.encoders.clip"):
            tiny.encode_text([huge_name])
        (message,) = [record.getMessage() for record in caplog.records]
        assert "\n" not in message
        assert len(message) < 250
        assert "x" * 60 + "\u2026" in message and "x" * 61 not in message

    def test_tiny_tokenizer_is_real_bpe(self, tiny) -> None:
        tokens = tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer("a photo of a building.")["input_ids"])
        assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "building</w>", ".</w>",
                          "<|endoftext|>"]
        assert tiny.tokenizer.eos_token_id == len(tiny.tokenizer) - 1


class TestCheckTokenizer:
    def test_broken_tokenizer_detected(self, tmp_path: Path) -> None:
        broken = CLIPTokenizer.from_pretrained(str(tmp_path))  # no vocab files: transformers does not complain
        with pytest.raises(ModelLoadError, match="broken") as info:
            check_tokenizer(broken, str(tmp_path))
        assert "vocab" in info.value.hint

    def test_all_unknown_detected(self, tiny) -> None:
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"x{i}": i + 2 for i in range(300)}}
        unknown_only = CLIPTokenizer(vocab=vocab, merges=[])
        with pytest.raises(ModelLoadError, match="unknown token|special tokens"):
            check_tokenizer(unknown_only, "test")

    def test_good_tokenizer_passes(self, tiny) -> None:
        check_tokenizer(tiny.tokenizer, "tiny")
