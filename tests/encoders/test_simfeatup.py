"""Tests of coninfer.encoders.simfeatup: the JBU maths (against an unfold reference), golden parity (fixture H,
upsampler maps), and loading from the real checkpoint layout (.ckpt), safetensors, the hub, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from coninfer.encoders import simfeatup
from coninfer.encoders.simfeatup import (
    JBUStage,
    SimFeatUp,
    build_from_state_dict,
    load_simfeatup,
    strip_prefix,
)
from coninfer.errors import CheckpointFormatError, InputError, InputFileError

JBU_FILE = "segearthov_jbu_one_state_dict.safetensors"
STAGE_KEYS = ("up_stage1", "up_stage2", "up_stage3_c4", "up_stage4", "up_out_c4")  # fixture name per depth


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hundreds of small memory-bound ops per stage: one thread is faster than two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (scaled so the kernels neither saturate nor vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module.eval()


def _reference_stage(stage: JBUStage, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """The JBU of the golden README, step by step, with unfold instead of shifted sums (float64)."""
    stage = stage.double()
    source, guidance = source.double(), guidance.double()
    radius, diameter = stage.radius, stage.diameter
    batch, _, height, width = guidance.shape
    keys = stage.range_proj[3](F.gelu(stage.range_proj[0](guidance)))
    windows = F.unfold(F.pad(keys, [radius] * 4, mode="reflect"), diameter)  # (B, k*d*d, H*W), tap p = i*d + j
    windows = windows.reshape(batch, keys.shape[1], diameter * diameter, height, width)
    similarity = (windows * keys[:, :, None]).sum(1)
    range_kernel = torch.softmax(stage.range_temp.exp().clamp(1e-4, 1e4) * similarity, dim=1)
    line = torch.linspace(-1, 1, diameter, dtype=torch.float64)
    spatial = torch.exp(-(line[:, None] ** 2 + line[None, :] ** 2) / (2 * stage.sigma_spatial ** 2)).reshape(-1)
    kernel = range_kernel * spatial[None, :, None, None]
    kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-7)
    fix = stage.fixup_proj
    kernel = kernel + 0.1 * fix[3](F.gelu(fix[0](torch.cat([kernel, guidance], 1))))
    upsampled = F.interpolate(source, size=(height, width), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(upsampled, [radius] * 4, mode="reflect"), diameter)
    patches = patches.reshape(batch, source.shape[1], diameter * diameter, height, width)
    stage.float()
    return (patches * kernel[:, None]).sum(2)


def _lightning_checkpoint(state_dict: dict, path: Path) -> Path:
    """Write ``state_dict`` the way the released SimFeatUp .ckpt files hold it (PyTorch Lightning 1.9 layout)."""
    torch.save({"epoch": 10, "global_step": 1000, "pytorch-lightning_version": "1.9.4",
                "state_dict": {f"upsampler.{name}": tensor for name, tensor in state_dict.items()},
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 10}}}}, "callbacks": {},
                "optimizer_states": [], "lr_schedulers": []}, path)
    return path


class TestJBUStage:
    @pytest.mark.parametrize("radius", [1, 3, 5])
    def test_matches_unfold_reference(self, radius: int) -> None:
        stage = _randomise(JBUStage(3, 8, radius), seed=radius)
        generator = torch.Generator().manual_seed(7)
        source = torch.randn(2, 5, 6, 7, generator=generator)
        guidance = torch.randn(2, 3, 12, 14, generator=generator)
        with torch.no_grad():
            output = stage(source, guidance)
            expected = _reference_stage(stage, source, guidance)
        assert output.shape == (2, 5, 12, 14)
        torch.testing.assert_close(output.double(), expected, atol=2e-5, rtol=1e-5)

    def test_kernel_is_normalised_before_the_fixup(self) -> None:
        stage = _randomise(JBUStage(3, 8, 2), seed=1)
        with torch.no_grad():
            stage.fixup_proj[3].weight.zero_()
            stage.fixup_proj[3].bias.zero_()
            kernel = stage.kernel(torch.randn(1, 3, 9, 11, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(kernel.sum(1), torch.ones(1, 9, 11))

    def test_constant_features_stay_constant(self) -> None:
        """With the fix-up off, a normalised kernel averages: a constant map is reproduced exactly."""
        stage = _randomise(JBUStage(3, 8, 3), seed=2)
        with torch.no_grad():
            stage.fixup_proj[3].weight.zero_()
            stage.fixup_proj[3].bias.zero_()
            output = stage(torch.full((1, 4, 5, 5), 2.5), torch.randn(1, 3, 10, 10))
        torch.testing.assert_close(output, torch.full((1, 4, 10, 10), 2.5))


class TestSimFeatUp:
    def test_shapes_and_stages(self) -> None:
        model = _randomise(SimFeatUp(6), seed=0)
        with torch.no_grad():
            output, stages = model(torch.randn(1, 6, 3, 4), torch.randn(1, 3, 48, 64), keep_stages=True)
        assert output.shape == (1, 6, 48, 64) and model.scale == 16
        assert [tuple(s.shape[-2:]) for s in stages] == [(6, 8), (12, 16), (24, 32), (48, 64)]
        assert model.stages() == [model.up] * 4

    def test_stack_uses_four_modules(self) -> None:
        model = SimFeatUp(4, layout="jbu_stack")
        assert len({id(stage) for stage in model.stages()}) == 4 and model.up1.radius == 3

    def test_bad_inputs(self) -> None:
        model = SimFeatUp(4)
        with pytest.raises(InputError, match="features"):
            model(torch.zeros(1, 5, 2, 2), torch.zeros(1, 3, 32, 32))
        with pytest.raises(InputError, match="image"):
            model(torch.zeros(1, 4, 3, 3), torch.zeros(2, 3, 48, 48))
        with pytest.raises(InputError, match="at least 3 patches"):
            model(torch.zeros(1, 4, 2, 5), torch.zeros(1, 3, 32, 80))
        with pytest.raises(InputError, match="layout"):
            SimFeatUp(4, layout="jbu_two")


def _golden_window_cases(golden_dir: Path) -> list[tuple[str, dict]]:
    """(name, {tokens (1, C, h, w), image (1, 3, Hp, Wp), expected maps}) of every fixture with upsampler maps."""
    cases = []
    for path in sorted(golden_dir.glob("segearthov_*case*.npz")) + sorted(golden_dir.glob("segov_predict2_*.npz")):
        with np.load(path, allow_pickle=False) as archive:
            data = dict(archive)
        if "crop_boxes" in data:  # SegEarth-OV: window 0, padded as the fixture says
            y1, y2, x1, x2 = data["crop_boxes"][0]
            window = (data["image_u8"][:, :, y1:y2, x1:x2].astype(np.float32) - 128) / 64
            image = F.pad(torch.from_numpy(window), tuple(int(p) for p in data["crop_pads"][0]))
            tokens = data["crop_tokens"][:1]
            expected = {name: data[name] for name in STAGE_KEYS if name in data}
        else:  # ConInfer predict2: image 0, whole
            image = torch.from_numpy((data["images_u8"][:1].astype(np.float32) - 128) / 64)
            tokens = data["tokens"][:1]
            expected = {"up_stage1": data["up_stage1_img0"]} if "up_stage1_img0" in data else {}
        if expected:
            grid_h, grid_w = image.shape[2] // 16, image.shape[3] // 16
            grid = torch.from_numpy(tokens).transpose(1, 2).reshape(1, -1, grid_h, grid_w)  # (1, h*w, C) -> grid
            cases.append((path.name, {"tokens": grid, "image": image, "expected": expected}))
    assert cases, f"no SegEarth-OV fixture with upsampler maps in {golden_dir}"
    return cases


def _compare_maps(model: SimFeatUp, cases: list[tuple[str, dict]]) -> dict[str, float]:
    errors = {}
    for name, case in cases:
        with torch.no_grad():  # only the stages the fixture stores: a 448-px stage 4 costs seconds
            if "up_out_c4" in case["expected"]:
                output, stages = model(case["tokens"], case["image"], keep_stages=True)
                stages = [*stages, output]
            else:
                depth = max(STAGE_KEYS.index(key) for key in case["expected"]) + 1
                stages = model.upsample_stages(case["tokens"], case["image"], depth)
        for key, expected in case["expected"].items():
            actual = stages[STAGE_KEYS.index(key)][0, : expected.shape[0]].numpy()
            assert actual.shape == expected.shape, (name, key)
            np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0, err_msg=f"{name} {key}")
            errors[f"{name}:{key}"] = float(np.abs(actual - expected).max())
    return errors


class TestGoldenParity:
    """Fixture H: the official JBUOne with the fixture's weights on the fixture's window-0 tokens."""

    def test_from_safetensors(self, golden_dir: Path) -> None:
        model = load_simfeatup(golden_dir / JBU_FILE)
        assert (model.layout, model.feature_dim, model.up.radius) == ("jbu_one", 32, 5)
        assert model.fingerprint.startswith("local:")
        _compare_maps(model, _golden_window_cases(golden_dir))

    def test_from_lightning_ckpt(self, golden_dir: Path, tmp_path: Path) -> None:
        raw = load_file(str(golden_dir / JBU_FILE))
        path = _lightning_checkpoint(strip_prefix(raw), tmp_path / "xclip_jbu_one_million_aid.ckpt")
        model = load_simfeatup(path)
        reference = load_simfeatup(golden_dir / JBU_FILE)
        for (name, tensor), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(),
                                                 strict=True):
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
        _compare_maps(model, _golden_window_cases(golden_dir))

    def test_summary_names_the_prefix(self, golden_dir: Path) -> None:
        summary = json.loads((golden_dir / "segearthov_summary.json").read_text())
        assert summary["key_prefix"] == simfeatup.KEY_PREFIX
        assert all(name.startswith(summary["key_prefix"]) for name in load_file(str(golden_dir / JBU_FILE)))


class TestLoad:
    @pytest.fixture
    def weights(self) -> dict[str, torch.Tensor]:
        return _randomise(SimFeatUp(8), seed=3).state_dict()

    def test_unprefixed_safetensors_and_pth(self, weights, tmp_path: Path) -> None:
        save_file(dict(weights), str(tmp_path / "plain.safetensors"))
        torch.save({"state_dict": dict(weights)}, tmp_path / "plain.pth")
        for name in ("plain.safetensors", "plain.pth"):
            loaded = load_simfeatup(tmp_path / name).state_dict()
            assert all(torch.equal(loaded[key], weights[key]) for key in weights), name

    def test_jbu_stack_layout_is_detected(self, tmp_path: Path) -> None:
        stack = _randomise(SimFeatUp(8, layout="jbu_stack"), seed=4)
        state = stack.state_dict()
        assert len(state) == 42  # as the released *_jbu_stack_cocostuff.ckpt (4 x 10 + 2)
        model = load_simfeatup(_lightning_checkpoint(state, tmp_path / "clip_jbu_stack.ckpt"))
        assert (model.layout, model.up1.radius, model.feature_dim) == ("jbu_stack", 3, 8)
        features, image = torch.randn(1, 8, 2, 3), torch.randn(1, 3, 32, 48)  # radius 3: 2 patches suffice
        with torch.no_grad():
            torch.testing.assert_close(model(features, image), stack(features, image))

    def test_hub_file_id(self, weights, tmp_path: Path, monkeypatch) -> None:
        path = _lightning_checkpoint(weights, tmp_path / "w.ckpt")
        calls = []

        def fake_download(repo_id: str, filename: str, *, revision=None) -> Path:
            calls.append((repo_id, filename, revision))
            return path

        monkeypatch.setattr(simfeatup, "hub_download", fake_download)
        model = load_simfeatup("owner/repo/weights/w.ckpt")
        assert calls == [("owner/repo", "weights/w.ckpt", None)] and model.name == "owner/repo/weights/w.ckpt"

    def test_preset_downloads_its_hub_file(self, weights, tmp_path: Path, monkeypatch) -> None:
        from coninfer.encoders.presets import UPSAMPLER, get_preset

        preset = get_preset("simfeatup-clip-b16", UPSAMPLER)
        path = _lightning_checkpoint(weights, tmp_path / "w.ckpt")
        calls = []
        monkeypatch.setattr(simfeatup, "hub_download",
                            lambda repo_id, filename, *, revision=None: calls.append((repo_id, filename)) or path)
        model = load_simfeatup("simfeatup-clip-b16")
        assert calls == [(preset.source, preset.filename)] and model.name == "simfeatup-clip-b16"
        assert preset.filename.endswith("xclip_jbu_one_million_aid.ckpt")  # the file SegEarth-OV's configs load

    def test_preset_offline_says_where_else_to_get_it(self, offline_hub) -> None:
        from coninfer.errors import ModelLoadError

        with pytest.raises(ModelLoadError, match="--upsampler simfeatup-clip-b16") as info:
            load_simfeatup("simfeatup-clip-b16")
        assert "github.com/likyoo/SegEarth-OV" in info.value.hint and "pass its path" in info.value.hint

    def test_tiny_random_preset_is_seeded_and_fits_the_tiny_clip(self) -> None:
        from coninfer.encoders.tiny import build_tiny_clip

        first, second = load_simfeatup("tiny-random"), simfeatup.build_tiny_simfeatup(seed=1)
        assert first.feature_dim == build_tiny_clip().embed_dim and first.fingerprint == "tiny-random:0"
        again = load_simfeatup("tiny-random").state_dict()
        assert all(torch.equal(again[k], v) for k, v in first.state_dict().items())
        assert not torch.equal(second.fixup_proj[1].weight, first.fixup_proj[1].weight)

    def test_a_local_file_wins_over_a_preset_name(self, weights, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.chdir(tmp_path)
        torch.save({"state_dict": dict(weights)}, tmp_path / "tiny-random")
        assert load_simfeatup("tiny-random").feature_dim == 8

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="not found"):
            load_simfeatup(tmp_path / "absent.ckpt")
        with pytest.raises(InputFileError, match="not found"):
            load_simfeatup("absent-folder/absent.txt")

    @pytest.mark.parametrize(("change", "message"), [
        ("drop_scalar", "missing 1 tensors, e.g. 'up.range_temp'"),
        ("drop_fixup", "missing 'up.fixup_proj.0.weight'"),
        ("extra", "1 unexpected tensors, e.g. 'up.extra.weight'"),
        ("shape", "shape mismatch for fixup_proj.1.bias"),
        ("foreign", "not a SimFeatUp"),
    ])
    def test_bad_checkpoint(self, weights, tmp_path: Path, change: str, message: str) -> None:
        state = dict(weights)
        if change == "drop_scalar":
            del state["up.range_temp"]
        elif change == "drop_fixup":
            del state["up.fixup_proj.0.weight"]
        elif change == "extra":
            state["up.extra.weight"] = torch.zeros(2)
        elif change == "shape":
            state["fixup_proj.1.bias"] = torch.zeros(9)
        else:
            state = {"visual.conv1.weight": torch.zeros(4, 3, 16, 16)}
        with pytest.raises(CheckpointFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_simfeatup(_lightning_checkpoint(state, tmp_path / "bad.ckpt"))

    def test_pickled_module_is_refused(self, tmp_path: Path) -> None:
        torch.save({"state_dict": SimFeatUp(4)}, tmp_path / "module.ckpt")  # unpickling needs coninfer's code
        with pytest.raises(CheckpointFormatError, match="refusing"):
            load_simfeatup(tmp_path / "module.ckpt")

    def test_odd_tap_count_rejected(self, weights) -> None:
        state = dict(weights)
        state["up.fixup_proj.0.weight"] = torch.zeros(120, 123, 1, 1)
        with pytest.raises(CheckpointFormatError, match="odd square"):
            build_from_state_dict(state)
