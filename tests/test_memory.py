"""The memory estimate of a scene run and the check before allocating (available memory injected: deterministic)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coninfer import memory
from coninfer.errors import ResourceError
from coninfer.memory import EncoderShape, RunShape, check_memory, estimate_run_memory

GIB = 2**30
# a ViT-B/16-like CLIP and a ViT-L/16-like VFM at 448 px: 28 x 28 patches
CLIP = EncoderShape(input_side=448, patch_size=16, width=768, heads=12, mlp_width=3072, prefix_tokens=1, out_dim=512)
VFM = EncoderShape(input_side=448, patch_size=16, width=1024, heads=16, mlp_width=4096, prefix_tokens=5, out_dim=1024)
SHAPE = RunShape(tile_size=448, batch_size=8, scene_width=20_000, scene_height=20_000, grid_side=28, num_classes=10,
                 num_queries=12, encoders=(CLIP, VFM))


def _suggested(error: pytest.ExceptionInfo[ResourceError]) -> dict[str, int]:
    return {name: int(value) for name, value in re.findall(r"--([a-z-]+) (\d+)", error.value.hint or "")}


class TestEstimate:
    def test_stitcher_band_is_tile_rows_by_scene_width_by_classes(self) -> None:
        parts = estimate_run_memory(SHAPE).parts
        assert parts["stitcher band"] == (10 + 1) * 448 * 20_000 * 4  # the 394 MB of raster/tiles.py's docstring

    def test_tile_pixels_and_model_inputs_grow_with_batch_and_tile_area(self) -> None:
        small, large = estimate_run_memory(SHAPE), estimate_run_memory(replace(SHAPE, tile_size=896, batch_size=16))
        # the batch's uint8 RGB + mask, and one tile read in float64 before the stretch
        assert small.parts["tile pixels"] == 8 * 448**2 * 4 + 448**2 * 3 * 8
        assert large.parts["tile pixels"] == 16 * 896**2 * 4 + 896**2 * 3 * 8
        assert large.parts["model inputs"] > 2 * small.parts["model inputs"]
        assert large.parts["logits"] == 2 * small.parts["logits"] == 2 * 8 * 28 * 28 * 12 * 4

    def test_cpu_run_counts_everything_on_the_host(self) -> None:
        cpu, gpu = estimate_run_memory(SHAPE), estimate_run_memory(replace(SHAPE, on_cuda=True))
        assert cpu.device_bytes == 0 and gpu.device_bytes > 0
        assert gpu.host_bytes < cpu.host_bytes <= gpu.host_bytes + gpu.device_bytes

    def test_a_cuda_run_keeps_the_stitcher_band_on_the_gpu(self) -> None:
        wide = replace(SHAPE, scene_width=400_000, on_cuda=True)  # the band: 7.9 GB, larger than any other part
        gpu, cpu = estimate_run_memory(wide), estimate_run_memory(replace(wide, on_cuda=False))
        band = gpu.parts["stitcher band"]
        assert gpu.device_bytes >= band > gpu.host_bytes
        assert cpu.host_bytes >= band and cpu.device_bytes == 0

    def test_peak_is_the_largest_phase_not_the_sum(self) -> None:
        estimate = estimate_run_memory(SHAPE)
        assert estimate.host_bytes < sum(estimate.parts.values())
        assert estimate.host_bytes >= estimate.parts["stitcher band"] + estimate.parts["tile probabilities"]

    def test_in_memory_run_holds_the_whole_scene(self) -> None:
        estimate = estimate_run_memory(replace(SHAPE, in_memory=True))
        assert estimate.parts["in-memory outputs"] == 20_000 * 20_000 * (1 + 4 * 10)
        assert estimate.host_bytes > estimate_run_memory(SHAPE).host_bytes + estimate.parts["in-memory outputs"]

    def test_the_issues_tile_of_a_hundred_thousand_pixels(self) -> None:
        huge = estimate_run_memory(replace(SHAPE, tile_size=100_000, scene_width=100_000, scene_height=100_000))
        assert huge.host_bytes > 100 * GIB


class TestCheck:
    def test_fitting_run_passes_and_returns_the_estimate(self) -> None:
        estimate = check_memory(SHAPE, available_host=64 * GIB)
        assert estimate == estimate_run_memory(SHAPE)

    def test_too_large_batch_names_both_options_and_a_batch_that_fits(self) -> None:
        shape = replace(SHAPE, tile_size=2048, batch_size=64, scene_width=4096, scene_height=4096)
        available = int(estimate_run_memory(replace(shape, batch_size=20)).host_bytes / memory.HEADROOM) + 16
        with pytest.raises(ResourceError) as error:
            check_memory(shape, available_host=available)
        line = str(error.value)
        assert "\n" not in line and "--tile-size 2048" in line and "--batch-size 64" in line and "host" in line
        assert _suggested(error) == {"batch-size": 20}  # the largest batch that fits: results do not depend on it
        with pytest.raises(ResourceError):
            check_memory(replace(shape, batch_size=21), available_host=available)

    def test_tile_too_large_even_alone_suggests_a_tile_size_that_fits(self) -> None:
        shape = replace(SHAPE, tile_size=8000, batch_size=4, scene_width=8000, scene_height=8000)
        available = 2 * GIB
        with pytest.raises(ResourceError) as error:
            check_memory(shape, available_host=available)
        fix = _suggested(error)
        assert fix["batch-size"] == 1 and fix["tile-size"] % 16 == 0
        fitting = replace(shape, batch_size=1, tile_size=fix["tile-size"])
        check_memory(fitting, available_host=available)
        with pytest.raises(ResourceError):
            check_memory(replace(fitting, tile_size=fix["tile-size"] + 16), available_host=available)

    def test_nothing_fits(self) -> None:
        with pytest.raises(ResourceError) as error:
            check_memory(SHAPE, available_host=1024)
        assert _suggested(error) == {} and "free memory" in error.value.hint

    def test_in_memory_scene_too_large_points_to_files(self) -> None:
        with pytest.raises(ResourceError) as error:
            check_memory(replace(SHAPE, in_memory=True), available_host=8 * GIB)
        assert "coninfer segment" in error.value.hint

    def test_gpu_is_checked_on_cuda(self) -> None:
        shape = replace(SHAPE, on_cuda=True, batch_size=32)
        with pytest.raises(ResourceError, match="of GPU memory") as error:
            check_memory(shape, available_host=64 * GIB, available_device=GIB)
        assert set(_suggested(error)) == {"batch-size"}
        check_memory(replace(SHAPE, on_cuda=False, batch_size=32), available_host=64 * GIB, available_device=GIB)

    def test_resource_error_is_a_memory_error(self) -> None:
        with pytest.raises(MemoryError):
            check_memory(SHAPE, available_host=1024)

    def test_unmeasurable_memory_is_not_checked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(memory, "available_host_memory", lambda: None)
        check_memory(replace(SHAPE, tile_size=100_000))


class TestAvailable:
    def test_meminfo_available_in_bytes(self, tmp_path: Path) -> None:
        meminfo = tmp_path / "meminfo"
        meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   23026440 kB\n")
        assert memory._meminfo_available(meminfo) == 23026440 * 1024
        meminfo.write_text("MemTotal: 1 kB\n")
        assert memory._meminfo_available(meminfo) is None
        assert memory._meminfo_available(tmp_path / "absent") is None

    def test_cgroup_v2_limit_counts_inactive_page_cache_as_free(self, tmp_path: Path) -> None:
        (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
        (tmp_path / "memory.current").write_text(f"{3 * GIB}\n")
        (tmp_path / "memory.stat").write_text(f"anon 100\ninactive_file {GIB // 2}\nactive_file 7\n")
        assert memory._cgroup_available(tmp_path) == GIB + GIB // 2

    def test_cgroup_without_limit(self, tmp_path: Path) -> None:
        (tmp_path / "memory.max").write_text("max\n")
        (tmp_path / "memory.current").write_text("123\n")
        v1 = tmp_path / "memory"
        v1.mkdir()
        (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        (v1 / "memory.usage_in_bytes").write_text("2029424640\n")
        assert memory._cgroup_available(tmp_path) is None

    def test_cgroup_v1_limit(self, tmp_path: Path) -> None:
        v1 = tmp_path / "memory"
        v1.mkdir()
        (v1 / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
        (v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
        (v1 / "memory.stat").write_text("inactive_file 5\ntotal_inactive_file 10\n")
        assert memory._cgroup_available(tmp_path) == GIB + 10

    def test_this_machine_reports_some_memory(self) -> None:
        available = memory.available_host_memory()
        assert available is not None and available > 0

    def test_no_gpu_off_cuda(self) -> None:
        assert memory.available_device_memory("cpu") is None


def test_run_shape_of_the_tiny_models(tmp_path: Path) -> None:
    from coninfer.pipeline import scene_grid
    from coninfer.prompts import ClassList
    from coninfer.settings import InferenceSettings, SceneOptions
    from coninfer.tile_step import load_models

    models = load_models(ClassList.parse("building; road, street; tree"), vlm="tiny-random", vfm="tiny-random",
                         device="cpu", precision="fp32", cache_dir=tmp_path)
    settings, options = InferenceSettings().with_values(model_res=64), SceneOptions(tile_size=100_000, batch_size=3)
    grid = scene_grid(300, 200, options)
    shape = memory.run_shape(models, settings, grid, options)
    assert (shape.tile_size, shape.batch_size, shape.scene_width, shape.grid_side) == (300, 3, 300, 4)
    assert (shape.num_classes, shape.num_queries, shape.on_cuda, shape.dtype_bytes) == (3, 4, False, 4)
    clip, vfm = shape.encoders
    assert (clip.input_side, clip.width, clip.out_dim) == (64, models.clip.vision_config.hidden_size,
                                                           models.clip.embed_dim)
    assert (vfm.out_dim, vfm.prefix_tokens) == (models.vfm.feature_dim, models.vfm.num_prefix_tokens)
    check_memory(shape)  # a 300 px scene fits on any machine that runs the tests


def test_run_shape_of_a_plug_in_encoder_with_only_the_protocol(tmp_path: Path) -> None:
    """A registered encoder need not wrap a transformers model: the estimate falls back to its output width."""
    from coninfer.pipeline import scene_grid
    from coninfer.prompts import ClassList
    from coninfer.settings import InferenceSettings, SceneOptions
    from coninfer.tile_step import load_models

    class Bare(torch.nn.Module):  # the DenseEncoder protocol and nothing else
        name, fingerprint, patch_size = "bare", "bare:1", 16

        def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(pixel_values.shape[0], (pixel_values.shape[-1] // 16) ** 2, 8)

    models = load_models(ClassList.parse("building; road"), vlm="tiny-random", vfm="tiny-random", device="cpu",
                         precision="fp32", cache_dir=tmp_path)
    models.vfm = Bare()
    settings, options = InferenceSettings().with_values(model_res=64), SceneOptions(tile_size=64)
    shape = memory.run_shape(models, settings, scene_grid(128, 128, options), options)
    vfm = shape.encoders[1]
    assert (vfm.out_dim, vfm.width, vfm.prefix_tokens) == (memory._PLUGIN_WIDTH, memory._PLUGIN_WIDTH, 1)
    check_memory(shape)
