"""DINOv3/DINOv2 checkpoint loading: golden parity (Meta and timm formats), round trips, refusals, hub errors."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from coninfer.encoders.convert_dinov3 import meta_to_timm
from coninfer.encoders.load_vfm import (
    CONINFER_JSON,
    PREPROCESSOR_JSON,
    detect_format,
    load_timm_dinov3,
    load_vfm,
    save_vfm_transformers,
)
from coninfer.encoders.normalization import IMAGENET, SAT493M
from coninfer.encoders.tiny import build_tiny_dinov2, build_tiny_dinov3
from coninfer.errors import CheckpointFormatError, InputError, InputFileError, ModelLoadError, OutputError
from exporters import export_meta_state_dict, transformers_to_timm

META_STEMS = ("dinov3_vitl16sat_tiny", "dinov3_vith16plus_tiny")
TIMM_STEMS = ("timm_dinov3_vitl16_tiny", "timm_dinov3_vith16plus_tiny", "timm_dinov3_vitl16qkvb_tiny")
TOLERANCE = 1e-4


class Pickled:
    """A custom class: a checkpoint holding it needs code execution to unpickle."""

    def __init__(self) -> None:
        self.payload = 1


def _golden(golden_dir: Path, stem: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
    config = json.loads((golden_dir / f"{stem}_config.json").read_text())
    with np.load(golden_dir / f"{stem}_outputs.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return golden_dir / f"{stem}_state_dict.safetensors", config, arrays


def _input(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy((arrays["images_u8"].astype(np.float32) - 128) / 64)


def _max_abs(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.detach().numpy() - expected).max())


def _tiny_with_biases(seed: int = 0, *, gated_mlp: bool = False):
    """A tiny DINOv3 whose q/v biases and mask token are non-zero, so conversions cannot silently drop them."""
    return build_tiny_dinov3(seed, num_hidden_layers=3 if gated_mlp else 2, gated_mlp=gated_mlp)


def _images(height: int = 64, width: int = 48) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(11))


class TestGoldenMeta:
    @pytest.mark.parametrize("stem", META_STEMS)
    def test_tokens_match_meta_code(self, golden_dir: Path, stem: str) -> None:
        weights, config, arrays = _golden(golden_dir, stem)
        vfm = load_vfm(weights, num_heads=config["DinoVisionTransformer_kwargs"]["num_heads"])
        tokens = vfm.all_tokens(_input(arrays))
        assert _max_abs(tokens[:, 5:], arrays["x_norm_patchtokens"]) < TOLERANCE
        assert _max_abs(tokens[:, 0], arrays["x_norm_clstoken"]) < TOLERANCE
        assert _max_abs(tokens[:, 1:5], arrays["x_storage_tokens"]) < TOLERANCE
        expected = arrays["x_norm_patchtokens"] / np.linalg.norm(arrays["x_norm_patchtokens"], axis=-1, keepdims=True)
        assert _max_abs(vfm.dense_features(_input(arrays)), expected) < TOLERANCE

    @pytest.mark.parametrize("stem", META_STEMS)
    def test_architecture_inferred(self, golden_dir: Path, stem: str) -> None:
        weights, config, _ = _golden(golden_dir, stem)
        kwargs = config["DinoVisionTransformer_kwargs"]
        vfm = load_vfm(weights)  # heads from the stored RoPE periods (head_dim / 4 of them)
        hf = vfm.model.config
        assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (
            kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"])
        gated = kwargs["ffn_layer"] == "swiglu"
        assert hf.use_gated_mlp == gated and hf.num_register_tokens == kwargs["n_storage_tokens"]
        # SwiGLU hidden = 2/3 * ratio * C rounded up to a multiple of 8; Mlp hidden = ratio * C
        ratio, width = kwargs["ffn_ratio"], kwargs["embed_dim"]
        expected = 8 * math.ceil(2 / 3 * ratio * width / 8) if gated else int(ratio * width)
        assert hf.intermediate_size == expected
        assert vfm.normalization == IMAGENET  # a bare Meta file records no statistics; its name is not read
        assert load_vfm(weights, normalization="sat493m").normalization == SAT493M

    def test_prenorm_and_rope_tables(self, golden_dir: Path) -> None:
        weights, _, arrays = _golden(golden_dir, "dinov3_vitl16sat_tiny")
        vfm = load_vfm(weights)
        pixels = _input(arrays)
        hidden = vfm.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        assert _max_abs(hidden, arrays["x_prenorm"]) < TOLERANCE
        cos, sin = vfm.model.rope_embeddings(pixels)
        assert _max_abs(cos, arrays["rope_cos"]) < 1e-5 and _max_abs(sin, arrays["rope_sin"]) < 1e-5

    def test_checkpoint_periods_are_used(self, golden_dir: Path, tmp_path: Path) -> None:
        weights, _, arrays = _golden(golden_dir, "dinov3_vitl16sat_tiny")
        state = load_file(str(weights))
        periods = state["rope_embed.periods"].to(torch.bfloat16).float() * 1.02  # as released, exaggerated
        state["rope_embed.periods"] = periods
        torch.save(state, tmp_path / "modified.pth")
        vfm = load_vfm(tmp_path / "modified.pth")
        torch.testing.assert_close(vfm.rope_periods, periods, rtol=0, atol=0)
        pixels = _input(arrays)
        assert _max_abs(vfm.patch_tokens(pixels), arrays["x_norm_patchtokens"]) > 1e-3
        # the RoPE tables follow Meta's formula with the stored periods: angle = 2 pi * coordinate / period
        coords = (torch.arange(28, dtype=torch.float64) + 0.5) / 28 * 2 - 1
        grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
        angles = 2 * math.pi * torch.cat([grid_y.reshape(-1, 1) / periods.double(),
                                          grid_x.reshape(-1, 1) / periods.double()], dim=1)
        cos, sin = vfm.model.rope_embeddings(pixels)
        torch.testing.assert_close(cos.double(), torch.cos(angles).tile(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(sin.double(), torch.sin(angles).tile(2), atol=1e-5, rtol=0)
        # identical to the original weights with the periods overridden afterwards
        reference = load_vfm(weights)
        reference.set_rope_periods(periods)
        torch.testing.assert_close(vfm.patch_tokens(pixels), reference.patch_tokens(pixels), rtol=0, atol=0)

    def test_contradicting_num_heads(self, golden_dir: Path) -> None:
        weights, _, _ = _golden(golden_dir, "dinov3_vith16plus_tiny")
        with pytest.raises(CheckpointFormatError, match="contradicts"):
            load_vfm(weights, num_heads=2)

    def test_nan_bias_mask_refused(self, golden_dir: Path, tmp_path: Path) -> None:
        state = load_file(str(_golden(golden_dir, "dinov3_vith16plus_tiny")[0]))
        state["blocks.1.attn.qkv.bias_mask"] = torch.full_like(state["blocks.1.attn.qkv.bias_mask"], math.nan)
        save_file(state, tmp_path / "scratch.safetensors")
        with pytest.raises(CheckpointFormatError, match=r"blocks\.1\.attn\.qkv\.bias_mask"):
            load_vfm(tmp_path / "scratch.safetensors")

    def test_k_bias_is_masked(self, golden_dir: Path, tmp_path: Path) -> None:
        weights, _, arrays = _golden(golden_dir, "dinov3_vith16plus_tiny")
        state = load_file(str(weights))
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            state[key][64:128] = 5.0  # the k third: zeroed by bias_mask in Meta's code
        save_file(state, tmp_path / "kbias.safetensors")
        vfm = load_vfm(tmp_path / "kbias.safetensors")
        assert vfm.model.config.key_bias is False
        assert _max_abs(vfm.patch_tokens(_input(arrays)), arrays["x_norm_patchtokens"]) < TOLERANCE


class TestGoldenTimm:
    @pytest.mark.parametrize("stem", TIMM_STEMS)
    def test_tokens_match_timm(self, golden_dir: Path, stem: str) -> None:
        weights, config, arrays = _golden(golden_dir, stem)
        vfm = load_vfm(weights, format="timm", num_heads=config["num_heads"])
        pixels = _input(arrays)
        np.testing.assert_array_equal(pixels.numpy(), arrays["x"])
        tokens = vfm.all_tokens(pixels)
        assert _max_abs(tokens, arrays["forward_features"]) < TOLERANCE
        assert _max_abs(vfm.patch_tokens(pixels), arrays["patch_tokens"]) < TOLERANCE
        assert _max_abs(tokens[:, 0], arrays["cls_token"]) < TOLERANCE
        assert _max_abs(tokens[:, 1:5], arrays["reg_tokens"]) < TOLERANCE
        assert vfm.model.config.use_gated_mlp == ("vith16plus" in stem)

    def test_timm_folder_reads_heads_from_config(self, golden_dir: Path, tmp_path: Path) -> None:
        weights, _, arrays = _golden(golden_dir, "timm_dinov3_vith16plus_tiny")
        folder = tmp_path / "timm_repo"
        folder.mkdir()
        shutil.copy(weights, folder / "model.safetensors")
        shutil.copy(golden_dir / "timm_dinov3_vith16plus_tiny_config.json", folder / "config.json")
        vfm = load_timm_dinov3(folder)
        assert vfm.model.config.num_attention_heads == 4
        assert _max_abs(vfm.patch_tokens(_input(arrays)), arrays["patch_tokens"]) < TOLERANCE

    def test_unknown_width_needs_num_heads(self, golden_dir: Path) -> None:
        weights = _golden(golden_dir, "timm_dinov3_vitl16_tiny")[0]  # no config.json beside it
        with pytest.raises(CheckpointFormatError, match="num_heads"):
            load_vfm(weights)

    def test_shape_mismatch_names_tensor(self, golden_dir: Path, tmp_path: Path) -> None:
        state = load_file(str(_golden(golden_dir, "timm_dinov3_vitl16_tiny")[0]))
        state["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 200)
        save_file(state, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointFormatError, match=r"layer\.1\.mlp\.down_proj\.weight.*\(64, 200\).*\(64, 256\)"):
            load_vfm(tmp_path / "bad.safetensors", num_heads=4)

    def test_unexpected_key_named(self, golden_dir: Path, tmp_path: Path) -> None:
        state = load_file(str(_golden(golden_dir, "timm_dinov3_vitl16_tiny")[0]))
        state["pos_embed"] = torch.zeros(1, 197, 64)
        save_file(state, tmp_path / "extra.safetensors")
        with pytest.raises(CheckpointFormatError, match="pos_embed"):
            load_vfm(tmp_path / "extra.safetensors", num_heads=4)

    def test_meta_and_timm_agree(self, golden_dir: Path) -> None:
        """Meta -> timm key renaming gives timm's keys (the fixture pair shares no weights, so compare key sets)."""
        meta = load_file(str(_golden(golden_dir, "dinov3_vith16plus_tiny")[0]))
        timm = load_file(str(_golden(golden_dir, "timm_dinov3_vith16plus_tiny")[0]))
        renamed, extras = meta_to_timm(meta)
        assert extras.rope_periods is not None and extras.mask_token.shape == (1, 1, 64)
        block0 = {k for k in renamed if k.startswith("blocks.0.")} - {"blocks.0.attn.q_bias", "blocks.0.attn.k_bias",
                                                                      "blocks.0.attn.v_bias"}
        assert block0 == {k for k in timm if k.startswith("blocks.0.")}
        assert detect_format(meta) == "meta" and detect_format(timm) == "timm"


class TestRoundTrips:
    @pytest.mark.parametrize("gated", [False, True])
    def test_transformers_folder(self, tmp_path: Path, gated: bool) -> None:
        vfm = _tiny_with_biases(1, gated_mlp=gated)
        vfm.set_rope_periods(vfm.rope_periods.to(torch.bfloat16).float())  # Meta-like periods must survive
        save_vfm_transformers(vfm, tmp_path / "hf")
        assert (tmp_path / "hf" / CONINFER_JSON).is_file() and (tmp_path / "hf" / "config.json").is_file()
        loaded = load_vfm(tmp_path / "hf")
        images = _images()
        torch.testing.assert_close(loaded.dense_features(images), vfm.dense_features(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.rope_periods, vfm.rope_periods, rtol=0, atol=0)
        assert loaded.name == vfm.name and loaded.normalization == vfm.normalization

    def test_meta_pth(self, tmp_path: Path) -> None:
        vfm = _tiny_with_biases(2, gated_mlp=True)
        vfm.set_rope_periods(vfm.rope_periods * 1.01)
        state = export_meta_state_dict(vfm)
        assert "storage_tokens" in state and "blocks.0.mlp.w1.weight" in state and state["mask_token"].shape == (1, 64)
        torch.save(state, tmp_path / "dinov3_tiny_sat493m.pth")
        loaded = load_vfm(tmp_path / "dinov3_tiny_sat493m.pth")
        images = _images()
        torch.testing.assert_close(loaded.patch_tokens(images), vfm.patch_tokens(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.rope_periods, vfm.rope_periods, rtol=0, atol=0)
        assert loaded.normalization == IMAGENET  # "sat493m" in the file name is not read: nothing is recorded
        assert load_vfm(tmp_path / "dinov3_tiny_sat493m.pth", normalization="sat493m").normalization == SAT493M
        torch.testing.assert_close(loaded.model.embeddings.mask_token, vfm.model.embeddings.mask_token)

    def test_meta_training_checkpoint_wrapper(self, tmp_path: Path) -> None:
        vfm = _tiny_with_biases(7)
        state = {f"backbone.{key}": value for key, value in export_meta_state_dict(vfm).items()}
        torch.save({"teacher": state, "iteration": 10}, tmp_path / "teacher_checkpoint.pth")
        loaded = load_vfm(tmp_path / "teacher_checkpoint.pth")
        images = _images()
        torch.testing.assert_close(loaded.patch_tokens(images), vfm.patch_tokens(images), rtol=0, atol=1e-6)

    @pytest.mark.parametrize("gated", [False, True])
    def test_timm_safetensors(self, tmp_path: Path, gated: bool) -> None:
        vfm = _tiny_with_biases(3, gated_mlp=gated)
        state = transformers_to_timm(vfm)
        assert "blocks.0.attn.q_bias" in state and "reg_token" in state
        save_file(state, tmp_path / "timm.safetensors")
        loaded = load_vfm(tmp_path / "timm.safetensors", num_heads=4, normalization="sat493m")
        images = _images(48, 80)
        torch.testing.assert_close(loaded.patch_tokens(images), vfm.patch_tokens(images), rtol=0, atol=1e-6)
        assert loaded.normalization == SAT493M

    def test_plain_timm_export_needs_zero_biases(self, tmp_path: Path) -> None:
        vfm = _tiny_with_biases(4)
        with pytest.raises(InputError, match="qkv_bias=True"):
            transformers_to_timm(vfm, qkv_bias=False)
        with torch.no_grad():
            for name, parameter in vfm.model.named_parameters():
                if name.endswith(("q_proj.bias", "v_proj.bias")):
                    parameter.zero_()
        state = transformers_to_timm(vfm)
        assert not any("q_bias" in k or "v_bias" in k for k in state)
        assert len([k for k in state if k.startswith("blocks.0.")]) == 13  # TIMM_DINOV3.md: 13 keys per Mlp block
        save_file(state, tmp_path / "plain.safetensors")
        loaded = load_vfm(tmp_path / "plain.safetensors", num_heads=4)
        images = _images()
        torch.testing.assert_close(loaded.patch_tokens(images), vfm.patch_tokens(images), rtol=0, atol=1e-6)

    def test_golden_meta_through_hf_folder(self, golden_dir: Path, tmp_path: Path) -> None:
        weights, _, arrays = _golden(golden_dir, "dinov3_vitl16sat_tiny")
        save_vfm_transformers(load_vfm(weights, normalization="sat493m"), tmp_path / "hf")
        loaded = load_vfm(tmp_path / "hf")
        assert loaded.normalization == SAT493M  # recorded in coninfer_vfm.json
        assert _max_abs(loaded.patch_tokens(_input(arrays)), arrays["x_norm_patchtokens"]) < TOLERANCE

    @pytest.mark.parametrize("registers", [0, 4])
    def test_dinov2_folder(self, tmp_path: Path, registers: int) -> None:
        vfm = build_tiny_dinov2(5, num_register_tokens=registers)
        save_vfm_transformers(vfm, tmp_path / "dinov2")
        loaded = load_vfm(tmp_path / "dinov2", normalization="sat493m")
        images = _images(56, 42)
        torch.testing.assert_close(loaded.dense_features(images), vfm.dense_features(images), rtol=0, atol=1e-6)
        assert (loaded.patch_size, loaded.num_prefix_tokens, loaded.normalization) == (14, 1 + registers, SAT493M)

    def test_plain_save_pretrained_folder(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        vfm = build_tiny_dinov3(6)
        vfm.model.save_pretrained(tmp_path / "dinov3-sat493m-copy")
        loaded = load_vfm(tmp_path / "dinov3-sat493m-copy")
        images = _images()
        torch.testing.assert_close(loaded.dense_features(images), vfm.dense_features(images), rtol=0, atol=1e-6)
        assert loaded.normalization == IMAGENET  # no statistics recorded: ImageNet's, whatever the folder's name
        assert "records no pixel statistics" in caplog.text

    def test_preprocessor_config_records_statistics(self, tmp_path: Path) -> None:
        folder = tmp_path / "dinov3-copy"
        build_tiny_dinov3(6).model.save_pretrained(folder)
        processor = {"image_mean": list(SAT493M.mean), "image_std": list(SAT493M.std), "do_normalize": True}
        (folder / PREPROCESSOR_JSON).write_text(json.dumps(processor))
        assert load_vfm(folder).normalization.mean == SAT493M.mean
        assert load_vfm(folder, normalization="imagenet").normalization == IMAGENET

    def test_save_refuses_non_empty_folder(self, tmp_path: Path) -> None:
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "file.txt").write_text("x")
        with pytest.raises(OutputError, match="not empty"):
            save_vfm_transformers(build_tiny_dinov3(0), tmp_path / "taken")
        save_vfm_transformers(build_tiny_dinov3(0), tmp_path / "taken", overwrite=True)


class TestRefusals:
    def test_pickle_with_custom_class(self, tmp_path: Path) -> None:
        torch.save({"cls_token": torch.zeros(1, 1, 64), "extra": Pickled()}, tmp_path / "evil.pth")
        with pytest.raises(CheckpointFormatError, match="refusing"):
            load_vfm(tmp_path / "evil.pth")

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="not found"):
            load_vfm(tmp_path / "absent.pth")

    def test_clip_checkpoint_given_as_vfm(self, tmp_path: Path) -> None:
        path = tmp_path / "RemoteCLIP-ViT-B-32.safetensors"
        save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.proj": torch.zeros(8, 4)}, str(path))
        with pytest.raises(CheckpointFormatError, match="CLIP") as info:
            load_vfm(path)
        assert "--vlm" in info.value.hint

    def test_unknown_format(self) -> None:
        with pytest.raises(InputError, match="unknown checkpoint format"):
            load_vfm("facebook/dinov2-large", format="onnx")

    def test_half_precision_on_cpu(self, tmp_path: Path) -> None:
        save_vfm_transformers(build_tiny_dinov3(0), tmp_path / "hf")
        with pytest.raises(InputError, match="CPU"):
            load_vfm(tmp_path / "hf", dtype=torch.float16)

    @pytest.mark.parametrize("repo_id", ["coninfer-tests/no-such-dinov3", "timm/vit_no_such_patch16_dinov3.sat493m"])
    def test_offline_hub_error(self, monkeypatch: pytest.MonkeyPatch, repo_id: str) -> None:
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ModelLoadError, match=repo_id.replace(".", r"\.")) as raised:
            load_vfm(repo_id)
        assert "local path" in (raised.value.hint or "")


class TestFingerprint:
    def test_replaced_checkpoint_changes_the_fingerprint(self, tmp_path: Path) -> None:
        path = tmp_path / "timm.safetensors"
        save_file(transformers_to_timm(_tiny_with_biases(3)), path)
        first = load_vfm(path, num_heads=4)
        assert first.fingerprint.startswith("local:") and load_vfm(path, num_heads=4).fingerprint == first.fingerprint
        save_file(transformers_to_timm(_tiny_with_biases(4)), path)  # same path, same size, other weights
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse file-system clocks
        assert load_vfm(path, num_heads=4).fingerprint != first.fingerprint

    def test_folder_fingerprint_sees_its_weights(self, tmp_path: Path) -> None:
        save_vfm_transformers(build_tiny_dinov3(0), tmp_path / "hf")
        before = load_vfm(tmp_path / "hf").fingerprint
        save_vfm_transformers(build_tiny_dinov3(1), tmp_path / "hf", overwrite=True)
        weights = tmp_path / "hf" / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert load_vfm(tmp_path / "hf").fingerprint != before


class TestOtherViTFolders:
    def test_plain_vit_folder_loads(self, tmp_path: Path) -> None:
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           patch_size=8, image_size=32)
        model = ViTModel(config, add_pooling_layer=False).eval()
        model.save_pretrained(tmp_path / "vit")
        loaded = load_vfm(tmp_path / "vit", normalization="imagenet")
        images = _images(32, 48)
        expected = torch.nn.functional.normalize(
            model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state[:, 1:], dim=-1)
        torch.testing.assert_close(loaded.dense_features(images), expected, rtol=0, atol=1e-6)
        assert (loaded.patch_size, loaded.num_prefix_tokens) == (8, 1)
