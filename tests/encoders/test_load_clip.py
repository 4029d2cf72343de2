"""Tests of coninfer.encoders.load_clip: checkpoint formats, round trips, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coninfer.encoders.clip import DenseCLIP
from coninfer.encoders.load_clip import (
    convert_open_clip_state_dict,
    load_clip,
    load_tokenizer,
    save_clip_transformers,
)
from coninfer.encoders.normalization import IMAGENET, OPENAI_CLIP
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.errors import CheckpointFormatError, InputError, InputFileError, ModelLoadError, OutputError
from coninfer.settings import DenseCLIPSettings
from exporters import to_open_clip_state_dict

TEXTS = ["a photo of a building.", "an aerial view of a road"]


@pytest.fixture(scope="module")
def tiny() -> DenseCLIP:
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tokenizer_folder(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny.tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def open_clip_state(tiny) -> dict[str, torch.Tensor]:
    return to_open_clip_state_dict(tiny)


def assert_same_model(loaded: DenseCLIP, reference: DenseCLIP, pixels: torch.Tensor, *, text: bool = True) -> None:
    for settings in (DenseCLIPSettings(), DenseCLIPSettings.for_variant("sclip")):
        torch.testing.assert_close(loaded.dense_tokens(pixels, settings), reference.dense_tokens(pixels, settings),
                                   atol=1e-6, rtol=1e-6)
    if text:
        torch.testing.assert_close(loaded.encode_text(TEXTS), reference.encode_text(TEXTS), atol=1e-6, rtol=1e-6)


class TestOpenClipNames:
    def test_keys_and_shapes(self, open_clip_state) -> None:
        shapes = {name: tuple(tensor.shape) for name, tensor in open_clip_state.items()}
        assert shapes["visual.conv1.weight"] == (64, 3, 16, 16)
        assert shapes["visual.positional_embedding"] == (197, 64)
        assert shapes["visual.transformer.resblocks.11.attn.in_proj_weight"] == (192, 64)
        assert shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"] == (256, 64)
        assert shapes["visual.proj"] == (64, 32)
        assert shapes["transformer.resblocks.1.attn.in_proj_bias"] == (192,)
        assert shapes["positional_embedding"] == (77, 64)
        assert shapes["text_projection"] == (64, 32)
        assert {"ln_final.weight", "token_embedding.weight", "logit_scale", "visual.class_embedding"} <= set(shapes)
        assert not any(name.startswith(("vision_model", "text_model")) for name in shapes)

    def test_convert_infers_sizes(self, open_clip_state) -> None:
        model = convert_open_clip_state_dict(open_clip_state, heads=4, text_heads=4, eos_token_id=765)
        vision, text = model.config.vision_config, model.config.text_config
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
                vision.image_size, vision.intermediate_size) == (64, 12, 4, 16, 224, 256)
        assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings, text.eos_token_id) == (
            64, 2, 77, 765)
        assert model.config.projection_dim == 32 and vision.hidden_act == "quick_gelu"


class TestRoundTrips:
    def test_transformers_folder(self, tiny, pixels, tmp_path: Path) -> None:
        save_clip_transformers(tiny, tmp_path / "model")
        assert (tmp_path / "model" / "config.json").is_file()
        loaded = load_clip(tmp_path / "model", settings="clearclip")
        assert loaded.settings == DenseCLIPSettings.for_variant("clearclip") and loaded.name == "model"
        assert_same_model(loaded, tiny, pixels)
        assert loaded.normalization.mean == OPENAI_CLIP.mean and loaded.fingerprint.startswith("local:")

    def test_folder_keeps_its_pixel_statistics(self, tiny, tmp_path: Path) -> None:
        other = build_tiny_clip(seed=0)
        other.normalization = IMAGENET
        save_clip_transformers(other, tmp_path / "model")  # into preprocessor_config.json
        assert load_clip(tmp_path / "model").normalization.mean == IMAGENET.mean
        assert load_clip(tmp_path / "model", normalization="openai_clip").normalization == OPENAI_CLIP

    def test_replaced_checkpoint_changes_the_fingerprint(self, open_clip_state, tokenizer_folder,
                                                         tmp_path: Path) -> None:
        path = tmp_path / "clip.safetensors"
        save_file(open_clip_state, str(path))
        first = load_clip(path, heads=4, text_heads=4, tokenizer=tokenizer_folder).fingerprint
        save_file({name: tensor * 1.01 for name, tensor in open_clip_state.items()}, str(path))
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse file-system clocks
        assert load_clip(path, heads=4, text_heads=4, tokenizer=tokenizer_folder).fingerprint != first

    def test_transformers_folder_exists(self, tiny, tmp_path: Path) -> None:
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "file").write_text("x")
        with pytest.raises(OutputError, match="not empty"):
            save_clip_transformers(tiny, tmp_path / "taken")

    @pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
    def test_open_clip_file(self, tiny, pixels, open_clip_state, tokenizer_folder, tmp_path: Path,
                            suffix: str) -> None:
        path = tmp_path / f"remoteclip-like{suffix}"
        if suffix == ".pt":
            torch.save({"state_dict": open_clip_state}, path)  # a training wrapper, as many releases have
        else:
            save_file(open_clip_state, str(path))
        loaded = load_clip(path, heads=4, text_heads=4, tokenizer=tokenizer_folder)
        assert loaded.name == "remoteclip-like"
        assert_same_model(loaded, tiny, pixels)

    def test_visual_only_state_dict(self, tiny, pixels, open_clip_state, tmp_path: Path) -> None:
        visual = {k: v for k, v in open_clip_state.items() if k.startswith("visual.")}
        path = tmp_path / "visual.safetensors"
        save_file(visual, str(path))
        loaded = load_clip(path, heads=4)
        assert not loaded.has_text
        assert_same_model(loaded, tiny, pixels, text=False)
        with pytest.raises(ModelLoadError, match="no text encoder"):
            loaded.encode_text(["road"])
        assert set(to_open_clip_state_dict(loaded)) == set(visual)

    def test_visual_only_transformers_folder(self, pixels, open_clip_state, tmp_path: Path) -> None:
        visual = {k: v for k, v in open_clip_state.items() if k.startswith("visual.")}
        model = convert_open_clip_state_dict(visual, heads=4)
        reference = DenseCLIP(model, name="visual")
        save_clip_transformers(reference, tmp_path / "visual")
        loaded = load_clip(tmp_path / "visual")
        assert not loaded.has_text
        assert_same_model(loaded, reference, pixels, text=False)

    def test_activation_override(self, tiny, pixels, open_clip_state, tmp_path: Path) -> None:
        visual = {k: v for k, v in open_clip_state.items() if k.startswith("visual.")}
        path = tmp_path / "visual.safetensors"
        save_file(visual, str(path))
        gelu = load_clip(path, heads=4, activation="gelu")
        assert gelu.vision_config.hidden_act == "gelu"
        assert not torch.allclose(gelu.dense_tokens(pixels), tiny.dense_tokens(pixels), atol=1e-3)
        with pytest.raises(InputError, match="activation"):
            load_clip(path, heads=4, activation="relu")


class TestErrors:
    def test_pickle_with_code_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "evil.pt"
        torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Payload()}, path)
        with pytest.raises(CheckpointFormatError, match="refusing"):
            load_clip(path, heads=4)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="not found"):
            load_clip(tmp_path / "missing.pt")
        with pytest.raises(InputFileError, match="not found"):
            load_clip("./nope/clip.safetensors")

    def test_not_a_clip_checkpoint(self, tmp_path: Path) -> None:
        path = tmp_path / "other.safetensors"
        save_file({"backbone.weight": torch.zeros(2, 2)}, str(path))
        with pytest.raises(CheckpointFormatError, match="visual.conv1.weight"):
            load_clip(path)

    def test_shape_mismatch_named(self, open_clip_state, tmp_path: Path) -> None:
        state = {k: v for k, v in open_clip_state.items() if k.startswith("visual.")}
        state["visual.transformer.resblocks.3.ln_2.weight"] = torch.ones(63)
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        with pytest.raises(CheckpointFormatError, match=r"resblocks|layers\.3\.layer_norm2"):
            load_clip(path, heads=4)

    def test_unexpected_key_named(self, open_clip_state, tmp_path: Path) -> None:
        state = {k: v for k, v in open_clip_state.items() if k.startswith("visual.")}
        state["visual.attn_pool.query"] = torch.zeros(4)
        path = tmp_path / "extra.safetensors"
        save_file(state, str(path))
        with pytest.raises(CheckpointFormatError, match="attn_pool"):
            load_clip(path, heads=4)

    def test_heads_must_divide_width(self, open_clip_state, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="heads"):
            convert_open_clip_state_dict(open_clip_state, heads=3)

    def test_broken_tokenizer_folder(self, tmp_path: Path) -> None:
        with pytest.raises(ModelLoadError, match="no CLIP tokenizer files"):
            load_tokenizer(tmp_path)

    def test_folder_without_weights(self, tiny, tmp_path: Path) -> None:
        tiny.model.config.save_pretrained(str(tmp_path))
        with pytest.raises(CheckpointFormatError, match="weights"):
            load_clip(tmp_path)

    def test_folder_of_another_model(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        with pytest.raises(CheckpointFormatError, match="bert"):
            load_clip(tmp_path)

    def test_hub_offline_is_clear(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        with pytest.raises(ModelLoadError, match="coninfer-tests/no-such-clip") as info:
            load_clip("coninfer-tests/no-such-clip")
        assert info.value.hint
        with pytest.raises(ModelLoadError, match="coninfer-tests/no-such-clip"):
            load_clip("coninfer-tests/no-such-clip/RemoteCLIP-ViT-B-32.pt")
        with pytest.raises(ModelLoadError, match="coninfer-tests/no-such-tokenizer"):
            load_tokenizer("coninfer-tests/no-such-tokenizer")


class _Payload:
    """A class only this test module defines: unpickling it needs code, so it must be refused."""
