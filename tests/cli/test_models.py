"""`coninfer models list|download|convert` through click's CliRunner, offline, with tiny models."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from coninfer.cli import main
from coninfer.encoders import presets
from coninfer.encoders.load_vfm import CONINFER_JSON
from coninfer.encoders.normalization import IMAGENET, OPENAI_CLIP, SAT493M
from coninfer.encoders.tiny import build_tiny_clip, build_tiny_dinov3
from coninfer.settings import DenseCLIPSettings
from exporters import export_meta_state_dict, to_open_clip_state_dict

TEXTS = ["a photo of a building.", "an aerial view of a road"]


def run(*args: str):
    return CliRunner().invoke(main, ["models", *args])


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(1))


class TestList:
    def test_every_preset_with_source_format_and_licence(self):
        result = run("list")
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0].split()[:5] == ["name", "role", "format", "source", "licence"]
        assert len(lines) == 1 + len(presets.PRESETS)
        for preset, line in zip(presets.PRESETS.values(), lines[1:], strict=True):
            assert line.startswith(preset.name)
            assert f" {preset.role} " in line and f" {preset.format} " in line
            assert preset.source in line and preset.licence in line
            if preset.filename:
                assert f"[{preset.filename}]" in line
        assert "(default)" in lines[1] and "(gated)" in next(line for line in lines if "sat-meta" in line)
        upsamplers = [line.split()[0] for line in lines if " upsampler " in line]
        assert upsamplers == ["simfeatup-clip-b16", "tiny-random"]


class TestDownload:
    @pytest.mark.parametrize("name", ["clip-b16", "remoteclip-b32", "dinov3-l16-sat", "dinov2-l14"])
    def test_offline_is_one_line_exit_2(self, offline_hub, name):
        result = run("download", name)
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and result.output.startswith("Error: cannot get ")
        assert presets.get_preset(name).source in result.output and "local path" in result.output
        assert not any(offline_hub.rglob("*.safetensors"))

    def test_tiny_needs_no_download(self):
        result = run("download", "tiny-random")
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "built in" in result.output and "--vlm tiny-random" in result.output

    def test_unknown_preset_lists_names(self):
        result = run("download", "clip-b99")
        assert result.exit_code == 2 and "'clip-b99'" in result.output
        assert all(name in result.output for name in presets.preset_names())


class TestConvert:
    def test_open_clip_safetensors_to_transformers(self, tiny_clip, pixels, tmp_path):
        save_file(to_open_clip_state_dict(tiny_clip), tmp_path / "tiny-clip.safetensors")
        tiny_clip.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
        output = tmp_path / "clip-hf"
        # the tiny model has 4 heads of width 16: not the width / 64 that CLIP checkpoints imply
        result = run("convert", str(tmp_path / "tiny-clip.safetensors"), str(output), "--role", "vlm",
                     "--heads", "4", "--text-heads", "4", "--tokenizer", str(tmp_path / "tokenizer"))
        assert result.exit_code == 0, result.output
        assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()
        loaded = presets.load_vlm(str(output))
        for settings in (DenseCLIPSettings(), DenseCLIPSettings.for_variant("maskclip")):
            torch.testing.assert_close(loaded.dense_tokens(pixels, settings), tiny_clip.dense_tokens(pixels, settings),
                                       rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(TEXTS), tiny_clip.encode_text(TEXTS), rtol=0, atol=1e-6)
        assert loaded.normalization.mean == OPENAI_CLIP.mean

    def test_meta_pth_to_transformers(self, pixels, tmp_path):
        vfm = build_tiny_dinov3(seed=3, gated_mlp=True)
        torch.save(export_meta_state_dict(vfm), tmp_path / "dinov3_tiny_sat493m.pth")
        output = tmp_path / "dinov3-hf"
        result = run("convert", str(tmp_path / "dinov3_tiny_sat493m.pth"), str(output), "--role", "vfm",
                     "--normalization", "sat493m")
        assert result.exit_code == 0, result.output
        assert (output / CONINFER_JSON).is_file()
        loaded = presets.load_vfm(str(output))
        torch.testing.assert_close(loaded.patch_tokens(pixels), vfm.patch_tokens(pixels), rtol=0, atol=1e-6)
        assert loaded.normalization == SAT493M  # given once at conversion, kept in the folder

    def test_without_normalization_a_bare_meta_file_gets_imagenet(self, tmp_path):
        torch.save(export_meta_state_dict(build_tiny_dinov3(seed=3)), tmp_path / "dinov3_tiny_sat493m.pth")
        result = run("convert", str(tmp_path / "dinov3_tiny_sat493m.pth"), str(tmp_path / "out"), "--role", "vfm")
        assert result.exit_code == 0, result.output
        assert presets.load_vfm(str(tmp_path / "out")).normalization == IMAGENET  # the name "sat493m" is not read

    def test_existing_output_needs_overwrite(self, tmp_path):
        output = tmp_path / "out"
        assert run("convert", "tiny-random", str(output), "--role", "vfm").exit_code == 0
        (output / "stale.txt").write_text("from an earlier conversion")
        result = run("convert", "tiny-random", str(output), "--role", "vfm")
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "--overwrite" in result.output
        result = run("convert", "tiny-random", str(output), "--role", "vfm", "--overwrite")
        assert result.exit_code == 0, result.output
        assert not (output / "stale.txt").exists()  # replaced, not merged
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left

    def test_overwrite_refuses_a_folder_that_is_not_a_model(self, tmp_path):
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("keep me")
        result = run("convert", "tiny-random", str(tmp_path / "notes"), "--role", "vfm", "--overwrite")
        assert result.exit_code == 2 and "not a model folder" in result.output
        assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    def test_output_is_a_file(self, tmp_path):
        (tmp_path / "model").write_text("")
        result = run("convert", "tiny-random", str(tmp_path / "model"), "--role", "vfm", "--overwrite")
        assert result.exit_code == 2 and "is a file" in result.output

    def test_clip_options_refused_for_vfm(self, tmp_path):
        result = run("convert", "tiny-random", str(tmp_path / "out"), "--role", "vfm", "--tokenizer", "x")
        assert result.exit_code == 2 and "--tokenizer" in result.output and not (tmp_path / "out").exists()

    def test_missing_source_is_one_line(self, tmp_path):
        result = run("convert", str(tmp_path / "absent.pth"), str(tmp_path / "out"), "--role", "vfm")
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "absent.pth" in result.output
        assert not (tmp_path / "out").exists()
