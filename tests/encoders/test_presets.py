"""Model presets and the loader registry: the tiny models, where each preset's files come from, clear errors."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import coninfer.encoders.load_clip as load_clip
import coninfer.encoders.load_vfm as load_vfm
from coninfer.encoders import LOADERS, DenseEncoder, TextEncoder, get_loader, presets, register_loader
from coninfer.encoders.checkpoints import hub_errors
from coninfer.encoders.clip import DenseCLIP
from coninfer.encoders.dinov3 import DenseVFM
from coninfer.encoders.normalization import IMAGENET, OPENAI_CLIP, SAT493M, Normalization
from coninfer.encoders.presets import PRESETS, ModelPreset, get_preset
from coninfer.errors import InputError, ModelLoadError


@pytest.fixture
def hub_calls(monkeypatch, tmp_path) -> list[tuple]:
    """Record hub requests instead of making them; files 'download' into tmp_path/<repo>/<file>."""
    calls: list[tuple] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> Path:
        calls.append(("file", repo_id, filename))
        return tmp_path / repo_id / filename

    def fake_snapshot(repo_id: str, *, allow_patterns=None, **kwargs) -> Path:
        calls.append(("snapshot", repo_id, tuple(allow_patterns or ())))
        folder = tmp_path / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").touch()
        return folder

    monkeypatch.setattr(presets, "hub_download", fake_download)
    monkeypatch.setattr(presets, "hub_snapshot", fake_snapshot)
    return calls


def record(monkeypatch, module, name: str) -> list[tuple]:
    """Replace ``module.name`` by a recorder of its (source, keyword arguments)."""
    calls: list[tuple] = []
    monkeypatch.setattr(module, name, lambda source, **kwargs: calls.append((source, kwargs)) or "model")
    return calls


class TestRegistry:
    def test_one_default_per_role_as_in_the_paper(self):
        assert presets.default_preset("vlm").name == "clip-b16"
        assert presets.default_preset("vfm").name == "dinov3-l16-sat"
        assert sum(p.default for p in PRESETS.values()) == 2

    def test_every_preset_has_a_loader_and_statistics(self):
        for preset in PRESETS.values():
            if preset.role == presets.UPSAMPLER:  # guided by the CLIP's input: no statistics, no loader registry
                assert preset.normalization is None and preset.format in ("simfeatup", "tiny"), preset.name
                continue
            assert callable(get_loader(preset.role, preset.format)), preset.name
            assert isinstance(preset.normalization, Normalization), preset.name
        assert get_preset("dinov3-l16-sat", "vfm").normalization == SAT493M
        assert get_preset("dinov3-l16-sat-meta", "vfm").normalization == SAT493M
        assert get_preset("dinov3-h16plus-lvd", "vfm").normalization == IMAGENET  # LVD-1689M: ImageNet's
        assert all(p.normalization == OPENAI_CLIP for p in PRESETS.values() if p.role == "vlm")

    def test_sources_fit_their_loaders(self):
        for preset in PRESETS.values():
            if preset.format == "timm":  # load_vfm fetches model.safetensors + config.json of a timm repo
                assert preset.source.startswith("timm/") and preset.filename == "model.safetensors"
            elif preset.format == "open_clip":  # one checkpoint file that load_clip reads
                assert preset.filename.endswith(load_clip.CHECKPOINT_SUFFIXES)
            elif preset.format == "simfeatup":  # one Lightning checkpoint file that load_simfeatup reads
                assert preset.filename.endswith(".ckpt") and preset.source.count("/") == 1
            elif preset.format == "transformers":
                assert preset.filename is None and preset.source.count("/") == 1
            assert preset.format != "meta"  # Meta's .pth files are not on the hub

    def test_gated_hint_names_an_ungated_preset(self):
        from huggingface_hub.errors import GatedRepoError

        response = SimpleNamespace(status_code=403, headers={}, request=None)  # what the error reads of it
        with pytest.raises(ModelLoadError) as info, hub_errors("facebook/dinov3-vitl16-pretrain-sat493m"):
            raise GatedRepoError("Access to model is restricted", response=response)
        named = re.search(r"preset ([\w.-]+)", info.value.hint).group(1)
        preset = get_preset(named, "vfm")
        assert not preset.gated and preset.role == "vfm"

    def test_upsampler_presets(self):
        assert presets.preset_names(presets.UPSAMPLER) == ["simfeatup-clip-b16", "tiny-random"]
        assert get_preset("tiny-random", presets.UPSAMPLER).builtin
        with pytest.raises(ValueError, match="format 'simfeatup'"):
            ModelPreset("x", "vfm", "owner/x", "simfeatup", "MIT", "", filename="x.ckpt")
        with pytest.raises(ValueError, match="format 'simfeatup'"):
            ModelPreset("x", presets.UPSAMPLER, "owner/x", "timm", "MIT", "", filename="x.ckpt")

    @pytest.mark.parametrize(("field", "changes"), [("role", {"role": "text"}), ("format", {"format": "on nx"}),
                                                    ("filename", {"filename": None}),
                                                    ("source", {"source": "builtin"}),
                                                    ("normalization", {"normalization": (0.5, 0.5, 0.5)})])
    def test_invalid_preset_names_the_field(self, field, changes):
        fields = {"name": "x", "role": "vfm", "source": "timm/x", "format": "timm", "licence": "MIT",
                  "description": "", "filename": "model.safetensors", **changes}
        with pytest.raises(ValueError, match=field):
            ModelPreset(**fields)


class TestLoaderRegistry:
    def test_builtin_formats_are_registered(self):
        get_loader("vlm", "tiny")  # imports the built-in loader modules
        assert {("vlm", "transformers"), ("vlm", "open_clip"), ("vlm", "tiny"), ("vfm", "transformers"),
                ("vfm", "timm"), ("vfm", "meta"), ("vfm", "tiny")} <= set(LOADERS)

    def test_unknown_format_names_the_known_ones(self):
        with pytest.raises(ModelLoadError, match="no vfm loader for format 'onnx'") as info:
            get_loader("vfm", "onnx")
        assert "timm" in info.value.hint and "register_loader" in info.value.hint

    def test_a_new_format_lands_in_one_place(self, monkeypatch):
        """A registered loader plus a preset entry is all a new model family needs."""
        monkeypatch.setattr(presets, "PRESETS", dict(PRESETS))
        monkeypatch.setattr("coninfer.encoders.LOADERS", dict(LOADERS))
        preset = ModelPreset("my-vit", "vfm", "owner/my-vit", "myformat", "MIT", "test", IMAGENET)
        presets.PRESETS[("vfm", "my-vit")] = preset
        calls = []

        @register_loader("vfm", "myformat")
        def load_mine(preset, *, device, dtype, **options):
            calls.append((preset.name, device, dtype, options))
            return "model"

        assert presets.load_vfm("my-vit", num_heads=4) == "model"
        assert calls == [("my-vit", "cpu", None, {"num_heads": 4})]
        with pytest.raises(ValueError, match="already registered"):
            register_loader("vfm", "myformat")(lambda preset, **kwargs: None)


class TestGetPreset:
    def test_tiny_random_is_a_preset_of_both_roles(self):
        assert get_preset("tiny-random", "vlm").role == "vlm" and get_preset("tiny-random", "vfm").role == "vfm"
        assert presets.is_preset("tiny-random", "vfm") and not presets.is_preset("clip-b16", "vfm")

    def test_unknown_name_lists_the_names(self):
        with pytest.raises(InputError, match="'clip-b99'") as info:
            get_preset("clip-b99")
        assert all(preset.name in info.value.hint for preset in PRESETS.values())

    def test_wrong_role_lists_that_role(self):
        with pytest.raises(InputError, match="is a vlm preset") as info:
            get_preset("clip-b16", "vfm")
        assert "dinov3-l16-sat" in info.value.hint and "clip-b16" not in info.value.hint


class TestTinyModels:
    def test_tiny_clip(self):
        model = presets.load_vlm("tiny-random", settings="clearclip")
        assert isinstance(model, DenseCLIP) and model.num_layers == 12 and model.has_text
        assert model.settings.variant == "clearclip" and model.dtype == torch.float32
        assert model.fingerprint == "tiny-random:0" and model.normalization == OPENAI_CLIP
        assert isinstance(model, DenseEncoder) and isinstance(model, TextEncoder)

    def test_tiny_vfm_is_seeded(self):
        first, second = presets.load_vfm("tiny-random"), presets.load_vfm("tiny-random")
        assert isinstance(first, DenseVFM) and isinstance(first, DenseEncoder)
        assert first.fingerprint == "tiny-random:0" and first.normalization == IMAGENET
        images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(first.dense_features(images), second.dense_features(images), rtol=0, atol=0)


class TestLoaderRouting:
    def test_timm_preset_loads_the_repo_as_timm(self, monkeypatch):
        calls = record(monkeypatch, load_vfm, "load_vfm")
        presets.load_vfm("dinov3-h16plus-lvd")
        assert calls == [("timm/vit_huge_plus_patch16_dinov3.lvd1689m",
                          {"device": "cpu", "dtype": None, "format": "timm", "normalization": IMAGENET})]

    def test_open_clip_preset_downloads_one_file(self, monkeypatch, hub_calls, tmp_path):
        calls = record(monkeypatch, load_clip, "load_clip")
        presets.load_vlm("remoteclip-b32")
        assert calls == [(tmp_path / "chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt",
                          {"device": "cpu", "dtype": None, "activation": "gelu", "normalization": OPENAI_CLIP})]
        assert hub_calls[0] == ("file", "chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt")
        assert hub_calls[1][:2] == ("snapshot", load_clip.DEFAULT_TOKENIZER)  # for offline use later

    def test_transformers_presets_load_the_repo_id(self, monkeypatch):
        clip_calls = record(monkeypatch, load_clip, "load_clip")
        vfm_calls = record(monkeypatch, load_vfm, "load_vfm")
        presets.load_vlm("clip-b16", activation="gelu")
        presets.load_vfm("dinov2-l14")
        assert clip_calls == [("openai/clip-vit-base-patch16", {"device": "cpu", "dtype": None, "activation": "gelu",
                                                                "normalization": OPENAI_CLIP})]
        assert vfm_calls[0][0] == "facebook/dinov2-large" and vfm_calls[0][1]["format"] == "transformers"

    def test_explicit_normalization_overrides_the_preset(self, monkeypatch):
        calls = record(monkeypatch, load_vfm, "load_vfm")
        presets.load_vfm("dinov3-l16-sat", normalization="imagenet")
        assert calls[0][1]["normalization"] == "imagenet"

    def test_paths_go_to_the_detecting_loader(self, monkeypatch, tmp_path):
        calls = record(monkeypatch, load_vfm, "load_vfm")
        presets.load_vfm(str(tmp_path), num_heads=4)
        assert calls == [(str(tmp_path), {"device": "cpu", "dtype": None, "num_heads": 4})]


class TestDownload:
    def test_timm_returns_the_folder_with_its_config(self, hub_calls, tmp_path):
        folder = presets.download("dinov3-l16-sat")
        assert hub_calls == [("file", "timm/vit_large_patch16_dinov3.sat493m", "config.json"),
                             ("file", "timm/vit_large_patch16_dinov3.sat493m", "model.safetensors")]
        assert folder == tmp_path / "timm/vit_large_patch16_dinov3.sat493m"

    def test_transformers_fetches_only_torch_weights(self, hub_calls):
        presets.download("clip-b16")
        [(kind, repo, patterns)] = hub_calls
        assert (kind, repo) == ("snapshot", "openai/clip-vit-base-patch16")
        assert "model*.safetensors" in patterns and not any(p in ("*", "*.h5", "*.msgpack") for p in patterns)

    def test_upsampler_fetches_its_one_checkpoint(self, hub_calls, tmp_path):
        preset = get_preset("simfeatup-clip-b16")
        assert presets.download("simfeatup-clip-b16") == tmp_path / preset.source / preset.filename
        assert hub_calls == [("file", "likyoo/SegEarth-OV", "simfeatup_dev/weights/xclip_jbu_one_million_aid.ckpt")]

    def test_offline_error_says_what_to_do(self, offline_hub):
        with pytest.raises(ModelLoadError, match="chendelong/RemoteCLIP") as info:
            presets.download("remoteclip-l14")
        assert "\n" not in str(info.value) and "local path" in info.value.hint

    def test_builtin_has_nothing_to_download(self):
        with pytest.raises(InputError, match="built in"):
            presets.download("tiny-random")


class TestSourceErrors:
    @pytest.mark.parametrize("load", [presets.load_vlm, presets.load_vfm])
    def test_unknown_preset_or_missing_path(self, load, tmp_path):
        for source in ("clip-b99", str(tmp_path / "absent"), "./weights.pt"):
            with pytest.raises(ModelLoadError, match=re.escape(repr(source))) as info:
                load(source)
            assert "\n" not in str(info.value) and "coninfer models list" in info.value.hint

    def test_preset_of_the_other_role(self):
        with pytest.raises(ModelLoadError, match="is a vfm preset"):
            presets.load_vlm("dinov3-l16-sat")
        with pytest.raises(ModelLoadError, match="is a vlm preset"):
            presets.load_vfm("clip-b16")
        with pytest.raises(ModelLoadError, match="neither a preset"):  # VFMs come as whole repositories
            presets.load_vfm("owner/name/model.pth")

    @pytest.mark.parametrize(("load", "repo_id"), [(presets.load_vlm, "coninfer-tests/no-such-clip"),
                                                   (presets.load_vlm, "coninfer-tests/no-such-clip/model.pt"),
                                                   (presets.load_vfm, "coninfer-tests/no-such-dinov3")])
    def test_hub_id_offline(self, offline_hub, load, repo_id):
        with pytest.raises(ModelLoadError, match="coninfer-tests/no-such-") as info:
            load(repo_id)
        assert "\n" not in str(info.value) and "local path" in info.value.hint
