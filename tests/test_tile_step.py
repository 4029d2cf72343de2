"""Tests of coninfer.tile_step: settings, devices, tile batches, encoding, solving, golden fixture E end to end."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import coninfer.tile_step as tile_step
import scenes
from coninfer.encoders.load_clip import load_clip
from coninfer.encoders.load_vfm import load_vfm
from coninfer.encoders.tiny import build_tiny_clip, build_tiny_dinov3
from coninfer.errors import CompileError, InputError
from coninfer.prompts import ClassList
from coninfer.settings import DenseCLIPSettings
from coninfer.solver import refine
from coninfer.tile_step import (
    InferenceSettings,
    Models,
    TileResult,
    as_tile_batch,
    encode_tiles,
    infer_tiles,
    load_models,
    resolve_device,
    resolve_dtype,
    solve,
    to_model_input,
)

EXACT = ((128 / 255,) * 3, (64 / 255,) * 3)
"""Normalisation that turns uint8 u into (u - 128) / 64 exactly, the golden fixtures' model input."""


def _unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with scenes.one_thread():
        yield


@pytest.fixture(scope="module")
def models() -> Models:
    """Tiny random CLIP (patch 16, 32-d embeddings) and DINOv3 (64-d), 3 classes / 4 queries."""
    classes = ClassList.parse("building,roof;road;water")
    return Models(build_tiny_clip(seed=0), build_tiny_dinov3(seed=0), classes, _unit_rows(4, 32, seed=1))


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """(3, 40, 56, 3) uint8: non-square tiles, resized to the model resolution."""
    return np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)


class TestInferenceSettings:
    def test_defaults_are_the_paper_config(self) -> None:
        settings = InferenceSettings()
        solver, post = settings.solver, settings.post
        assert (settings.model_res, solver.temperature, solver.iterations, solver.prior_scale) == (448, 50, 10, 100)
        assert (solver.init_topk, post.logit_scale, post.prob_thd, settings.method) == (8, 5.0, 0.0, "coninfer")

    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"model_res": 8}, "model_res"), ({"model_res": 33}, "model_res"), ({"method": "sam"}, "method"),
        ({"features": "dino"}, "features"), ({"prob_thd": 1.5}, "prob_thd"), ({"prob_thd": -0.1}, "prob_thd"),
        ({"logit_scale": 0.0}, "logit_scale"), ({"temperature": 0.0}, "temperature"),
        ({"iterations": -1}, "iterations"), ({"prior_scale": float("inf")}, "prior_scale"),
        ({"init_topk": 0}, "init_topk"), ({"bg_index": -1}, "bg_index"),
    ])  # fmt: skip
    def test_invalid_field_is_named(self, kwargs: dict, field: str) -> None:
        with pytest.raises(InputError, match=field.replace("_", "[_-]")):
            InferenceSettings().with_values(**kwargs)

    def test_solver_settings_carry_the_numbers(self) -> None:
        solver = InferenceSettings().with_values(temperature=20.0, iterations=3, prior_scale=50.0, init_topk=4).solver
        assert (solver.temperature, solver.iterations, solver.prior_scale, solver.init_topk) == (20.0, 3, 50.0, 4)


class TestResolveDevice:
    def test_auto_follows_cuda_availability(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_device("auto") == torch.device("cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("auto") == torch.device("cuda")

    def test_explicit_cpu(self) -> None:
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device(torch.device("cpu")) == torch.device("cpu")

    def test_unknown_device(self) -> None:
        with pytest.raises(InputError, match="unknown device 'gpu0'") as error:
            resolve_device("gpu0")
        assert "cuda:N" in error.value.hint

    def test_cuda_without_cuda(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(InputError, match="CUDA is not available") as error:
            resolve_device("cuda:1")
        assert error.value.hint == "use --device cpu"

    def test_unsupported_backend(self) -> None:
        with pytest.raises(InputError, match="meta"):
            resolve_device("meta")


class TestResolveDtype:
    @pytest.fixture(autouse=True)
    def _cpu_without_bf16(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONINFER_CPU_BF16", "0")  # the CPU rows below; bf16 CPUs: tests/test_precision.py

    @pytest.mark.parametrize(("precision", "device", "dtype"), [
        ("auto", "cpu", torch.float32), ("fp32", "cpu", torch.float32), ("auto", "cuda", torch.float16),
        ("fp16", "cuda", torch.float16), ("bf16", "cuda", torch.bfloat16), ("fp32", "cuda", torch.float32),
    ])  # fmt: skip
    def test_choices(self, precision: str, device: str, dtype: torch.dtype) -> None:
        assert resolve_dtype(precision, torch.device(device)) == dtype

    def test_unknown_precision(self) -> None:
        with pytest.raises(InputError, match="unknown precision 'fp64'"):
            resolve_dtype("fp64", torch.device("cpu"))

    @pytest.mark.parametrize("precision", ["fp16", "bf16"])
    def test_half_precision_on_cpu(self, precision: str) -> None:
        with pytest.raises(InputError, match=f"{precision} is not supported on the CPU") as error:
            resolve_dtype(precision, torch.device("cpu"))
        assert "fp32" in error.value.hint


class TestModels:
    def test_normalisation_defaults_to_the_models(self, models: Models) -> None:
        assert models.clip_normalization == (models.clip.image_mean, models.clip.image_std)
        assert models.vfm_normalization == (models.vfm.image_mean, models.vfm.image_std)

    def test_query_count_must_match(self, models: Models) -> None:
        with pytest.raises(InputError, match=r"query_embeddings must be \(K=4, E\)"):
            Models(models.clip, models.vfm, models.classes, _unit_rows(3, 32, seed=0))

    def test_grid_size(self, models: Models) -> None:
        assert models.grid_size(448) == 28
        with pytest.raises(InputError, match="not a multiple of the VFM patch size 16") as error:
            models.grid_size(50)
        assert "e.g. 48" in error.value.hint

    def test_grid_without_vfm_uses_clip_patch(self, models: Models) -> None:
        clip_only = Models(models.clip, None, models.classes, models.query_embeddings)
        assert clip_only.vfm_normalization is None
        assert clip_only.grid_size(64) == 4


class TestTileBatch:
    def test_layouts(self, tiles: np.ndarray) -> None:
        from_hwc = as_tile_batch(tiles)
        from_chw = as_tile_batch(np.moveaxis(tiles, -1, 1))
        from_list = as_tile_batch([tiles[0], np.moveaxis(tiles[1], -1, 0)])
        assert [tuple(t.shape) for t in from_hwc] == [(3, 40, 56)] * 3
        assert all(torch.equal(a, b) for a, b in zip(from_hwc, from_chw, strict=True))
        assert torch.equal(from_list[1], from_hwc[1])

    def test_read_only_arrays(self, tiles: np.ndarray) -> None:
        frozen = tiles.copy()
        frozen.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when it is handed a read-only array
            batch = as_tile_batch(frozen)
        assert torch.equal(batch[0].permute(1, 2, 0), torch.from_numpy(tiles[0]))

    @pytest.mark.parametrize(("images", "message"), [
        ([np.zeros((8, 8, 3), np.float32)], "dtype"), ([np.zeros((8, 8), np.uint8)], "expected"),
        ([np.zeros((8, 8, 4), np.uint8)], "RGB"), ([], "no tiles"),
    ])  # fmt: skip
    def test_bad_tiles(self, images: list, message: str) -> None:
        with pytest.raises(InputError, match=message):
            as_tile_batch(images)

    def test_exact_normalisation(self, tiles: np.ndarray) -> None:
        batch = as_tile_batch(tiles)
        pixels = to_model_input([t[:, :, :40] for t in batch], 40, EXACT, "cpu", torch.float32)
        expected = (torch.stack([t[:, :, :40] for t in batch]).float() - 128) / 64
        assert torch.equal(pixels, expected)

    def test_resize_keeps_a_constant_tile(self) -> None:
        constant = [torch.full((3, 30, 50), 200, dtype=torch.uint8)]
        pixels = to_model_input(constant, 32, EXACT, "cpu", torch.float32)
        assert pixels.shape == (1, 3, 32, 32)
        torch.testing.assert_close(pixels, torch.full_like(pixels, (200 - 128) / 64))


class TestEncodeAndSolve:
    def test_shapes_and_norms(self, models: Models, tiles: np.ndarray) -> None:
        logits, features = encode_tiles(models, as_tile_batch(tiles), InferenceSettings().with_values(model_res=32))
        assert logits.shape == (3, 4, 4) and logits.dtype == torch.float32
        assert features.shape == (3, 4, 64)  # the VFM's width
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, 4))
        assert float(logits.abs().max()) <= 1.0 + 1e-5  # cosine similarities

    def test_clip_features(self, models: Models, tiles: np.ndarray) -> None:
        settings = InferenceSettings().with_values(model_res=32, features="clip")
        logits, features = encode_tiles(models, as_tile_batch(tiles), settings)
        assert features.shape == (3, 4, 32)  # CLIP's own tokens, whose products with the queries are the logits
        torch.testing.assert_close(features.float() @ models.query_embeddings.T, logits)

    def test_vfm_needed(self, models: Models, tiles: np.ndarray) -> None:
        clip_only = Models(models.clip, None, models.classes, models.query_embeddings)
        with pytest.raises(InputError, match="needs a VFM") as error:
            encode_tiles(clip_only, as_tile_batch(tiles), InferenceSettings().with_values(model_res=32))
        assert "--vfm" in error.value.hint

    def test_solve_is_the_solver(self) -> None:
        logits, features = _unit_rows(40, 3, seed=2) * 0.3, _unit_rows(40, 8, seed=3)
        z = solve(logits, features, InferenceSettings().with_values(temperature=20.0, iterations=4))
        torch.testing.assert_close(z, refine(logits, features, temperature=20.0, iterations=4))

    def test_baseline_is_the_prior(self) -> None:
        logits, features = _unit_rows(40, 3, seed=2) * 0.3, _unit_rows(40, 8, seed=3)
        z = solve(logits, features, InferenceSettings().with_values(method="baseline", prior_scale=30.0))
        torch.testing.assert_close(z, torch.softmax(30.0 * logits, dim=-1))


class TestInferTiles:
    def test_results_at_each_tile_size(self, models: Models) -> None:
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)]
        results = infer_tiles(models, images, InferenceSettings().with_values(model_res=32, init_topk=4))
        assert [r.labels.shape for r in results] == [(40, 56), (20, 24)]
        for result in results:
            assert isinstance(result, TileResult)
            assert result.labels.dtype == np.uint8 and result.probs.dtype == np.float32
            assert result.probs.shape == (3, *result.labels.shape)
            np.testing.assert_array_equal(result.labels, result.probs.argmax(axis=0))
        labels_only = infer_tiles(models, images, InferenceSettings().with_values(model_res=32, init_topk=4),
                                  probabilities=False)  # the evaluation path: the same labels, no probabilities
        assert all(only.probs is None for only in labels_only)
        for only, result in zip(labels_only, results, strict=True):
            np.testing.assert_array_equal(only.labels, result.labels)

    def test_output_sizes(self, models: Models, tiles: np.ndarray) -> None:
        results = infer_tiles(models, tiles, InferenceSettings().with_values(model_res=32), output_sizes=[(10, 12)] * 3)
        assert {r.labels.shape for r in results} == {(10, 12)}

    def test_baseline_without_vfm(self, models: Models, tiles: np.ndarray) -> None:
        clip_only = Models(models.clip, None, models.classes, models.query_embeddings)
        settings = InferenceSettings().with_values(model_res=32, method="baseline")
        baseline = infer_tiles(clip_only, tiles, settings)
        logits, _ = encode_tiles(clip_only, as_tile_batch(tiles), settings)
        # the prior alone: a corner pixel takes the class of the top query of its corner patch (2 x 2 grid)
        patch_classes = torch.tensor(models.classes.query_to_class)[logits.argmax(dim=-1)]  # (B, 4)
        for result, expected in zip(baseline, patch_classes.tolist(), strict=True):
            assert result.labels[[0, 0, -1, -1], [0, -1, 0, -1]].tolist() == expected

    def test_prob_thd_gives_background(self, models: Models, tiles: np.ndarray) -> None:
        results = infer_tiles(models, tiles, InferenceSettings().with_values(model_res=32, prob_thd=1.0, bg_index=2))
        assert all((r.labels == 2).all() for r in results)


@pytest.fixture(scope="module")
def golden_e2e(golden_dir: Path) -> tuple[dict, dict, Models]:
    """Fixture E: the golden CLIP (C) and DINOv3 (D), the stored queries, and the exact (u8 - 128) / 64 input."""
    with np.load(golden_dir / "e2e_case1.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["meta_json"]))
    clip_settings = DenseCLIPSettings(meta["model_type"], meta["ignore_residual"], meta["attn_lambda"])
    clip_config = json.loads((golden_dir / "clip_config.json").read_text())
    clip = load_clip(golden_dir / meta["clip_state_dict"], heads=clip_config["heads"], settings=clip_settings)
    vfm = load_vfm(golden_dir / meta["dino_state_dict"], num_heads=meta["dino_ctor_kwargs"]["num_heads"])
    # one class per run of equal query_idx values; the synonyms of a class are separate queries
    classes = ClassList.from_names([
        ",".join(f"q{query}" for query in np.flatnonzero(arrays["query_idx"] == cls))
        for cls in range(int(arrays["query_idx"].max()) + 1)
    ])
    assert classes.query_to_class == tuple(arrays["query_idx"].tolist())
    queries = torch.from_numpy(arrays["query_features"])
    models = Models(clip, vfm, classes, queries, clip_normalization=EXACT, vfm_normalization=EXACT)
    return arrays, meta, models


class TestGoldenEndToEnd:
    """Golden fixture E: official predict -> dense_forward -> gmm_fitting -> postprocess on two 448 px images."""

    @staticmethod
    def _settings(meta: dict, model_res: int) -> InferenceSettings:
        # every setting from the fixture, the dense-CLIP ones included (they travel in the settings, per call)
        clip = DenseCLIPSettings(meta["model_type"], meta["ignore_residual"], meta["attn_lambda"])
        return InferenceSettings(clip=clip).with_values(
            model_res=model_res, temperature=meta["gmm_temp"], logit_scale=meta["logit_scale"], prob_thd=meta["prob_thd"],
            bg_index=meta["bg_idx"])

    def test_encode_and_solve(self, golden_e2e: tuple[dict, dict, Models]) -> None:
        arrays, meta, models = golden_e2e
        tiles = as_tile_batch(arrays["images_u8"])
        logits, features = encode_tiles(models, tiles, self._settings(meta, int(arrays["images_u8"].shape[-1])))
        np.testing.assert_allclose(logits.numpy(), arrays["clip_logits"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(features.numpy(), arrays["dino_feats"], atol=1e-4, rtol=0)
        batch, patches, queries = logits.shape
        z = solve(logits.reshape(batch * patches, queries), features.reshape(batch * patches, -1), self._settings(meta, int(arrays["images_u8"].shape[-1])))
        np.testing.assert_allclose(z.numpy(), arrays["z"], atol=2e-4, rtol=0)

    def test_labels(self, golden_e2e: tuple[dict, dict, Models]) -> None:
        arrays, meta, models = golden_e2e
        images = np.moveaxis(arrays["images_u8"], 1, -1)  # (B, 3, H, W) -> (B, H, W, 3)
        results = infer_tiles(models, images, self._settings(meta, int(arrays["images_u8"].shape[-1])), output_sizes=[tuple(meta["ori_shape"])] * 2)
        labels = np.stack([r.labels for r in results])
        assert labels.shape == arrays["pred"].shape
        robust = ~arrays["fragile"]
        np.testing.assert_array_equal(labels[robust], arrays["pred"][robust])


class TestHostToDevice:
    """Tiles go to a CUDA device as uint8 through pinned memory, asynchronously; CPU runs never pin."""

    def test_the_rule(self) -> None:
        host = [torch.zeros((3, 4, 4), dtype=torch.uint8)]
        assert tile_step._pinned_copies(torch.device("cuda"), host)
        assert tile_step._pinned_copies(torch.device("cuda:1"), host)
        assert not tile_step._pinned_copies(torch.device("cpu"), host)
        # tiles already off the host (here the meta device; on a GPU, CUDA tensors) are not pinned
        assert not tile_step._pinned_copies(torch.device("cuda"), [torch.zeros((3, 4, 4), device="meta")])

    def test_cpu_runs_never_pin(self, models: Models, tiles: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*args, **kwargs):
            raise AssertionError("pinned memory on a CPU run")

        monkeypatch.setattr(tile_step, "_pinned_empty", refuse)
        monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
        results = infer_tiles(models, tiles, InferenceSettings().with_values(model_res=32))
        assert len(results) == 3

    def test_cuda_path_stacks_into_pinned_memory_and_copies_async(self, tiles: np.ndarray,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        batch = as_tile_batch(tiles)
        expected = to_model_input(batch, 32, EXACT, "cpu", torch.float32)
        buffers, copies = [], []
        original_to = torch.Tensor.to

        def fake_pinned(shape):  # no CUDA here: a plain host buffer stands for the pinned one
            buffers.append(torch.empty(shape, dtype=torch.uint8))
            return buffers[-1]

        def spy_to(tensor, *args, **kwargs):
            copies.append((tensor.data_ptr(), tensor.dtype, kwargs.get("non_blocking", False)))
            return original_to(tensor, *args, **kwargs)

        monkeypatch.setattr(tile_step, "_pinned_copies", lambda device, tiles: True)  # as if the device were CUDA
        monkeypatch.setattr(tile_step, "_pinned_empty", fake_pinned)
        monkeypatch.setattr(torch.Tensor, "to", spy_to)
        pixels = to_model_input(batch, 32, EXACT, "cpu", torch.float32)
        assert torch.equal(pixels, expected)
        [buffer] = buffers
        assert buffer.shape == (3, 3, 40, 56) and torch.equal(buffer, torch.stack(batch))
        # the buffer itself is copied, as uint8 (the float conversion happens on the device), without blocking
        assert (buffer.data_ptr(), torch.uint8, True) in copies


@pytest.fixture(scope="module")
def compiled_and_eager() -> tuple[Models, Models]:
    """Two copies of the tiny models, the second with both encoders compiled (CPU inductor: needs g++)."""
    classes = ClassList.parse("building,roof;road;water")
    eager = Models(build_tiny_clip(seed=0), build_tiny_dinov3(seed=0), classes, _unit_rows(4, 32, seed=1))
    compiled = Models(tile_step.compile_encoder(build_tiny_clip(seed=0)),
                      tile_step.compile_encoder(build_tiny_dinov3(seed=0)), classes, _unit_rows(4, 32, seed=1))
    return eager, compiled


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
class TestCompile:
    @pytest.mark.slow
    def test_compiled_encoders_give_the_same_labels(self, compiled_and_eager: tuple[Models, Models],
                                                    tiles: np.ndarray) -> None:
        try:
            tile_step.check_compile_available(torch.device("cpu"))
        except CompileError as error:
            pytest.skip(f"inductor cannot run here: {error}")
        eager, compiled = compiled_and_eager
        settings = InferenceSettings().with_values(model_res=64)
        expected, got = infer_tiles(eager, tiles, settings), infer_tiles(compiled, tiles, settings)
        for want, result in zip(expected, got, strict=True):
            np.testing.assert_array_equal(result.labels, want.labels)
            # measured (torch 2.13, 2-core EPYC, fp32): max |Δp| 1.2e-7; features differ by float rounding only
            np.testing.assert_allclose(result.probs, want.probs, atol=1e-5, rtol=0)
        # one batch size only: a second (a run's last batch) recompiles, ~30 s more on a cold inductor cache

    def test_compiling_keeps_weights_and_fingerprints(self, compiled_and_eager: tuple[Models, Models]) -> None:
        eager, compiled = compiled_and_eager
        for a, b in ((eager.clip, compiled.clip), (eager.vfm, compiled.vfm)):
            assert [name for name, _ in a.named_parameters()] == [name for name, _ in b.named_parameters()]
            assert a.fingerprint == b.fingerprint  # resume and embedding keys do not change with --compile
        assert tile_step.compile_encoder(compiled.clip) is compiled.clip  # idempotent: compiled once

    def test_the_flag_reaches_torch_compile(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = []

        def fake_compile(function, **options):
            calls.append((getattr(function, "__name__", type(function).__name__), options))
            return function

        monkeypatch.setattr(torch, "compile", fake_compile)
        load = dict(vlm="tiny-random", vfm="tiny-random", device="cpu", precision="fp32")
        classes = ClassList.parse("building;road")
        plain = load_models(classes, **load)
        assert calls == [] and not hasattr(plain.clip, "_coninfer_compiled")
        models = load_models(classes, **load, compile_models=True)
        # CLIP's dense_features; the VFM's backbone (nn.Module.compile goes through torch.compile)
        assert calls == [("dense_features", {"dynamic": None}), ("_call_impl", {"dynamic": None})]
        assert models.clip._coninfer_compiled and models.vfm._coninfer_compiled

    def test_no_cpp_compiler_stops_before_loading(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch._inductor.config as inductor_config

        from coninfer.encoders import presets

        monkeypatch.setattr(presets, "load_vlm", lambda *a, **k: pytest.fail("loaded a model before the check"))
        # config.patch, not monkeypatch: undoing a setattr on inductor's config deletes the key
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}), \
                pytest.raises(CompileError, match="C\\+\\+ compiler") as raised:
            load_models(ClassList.parse("a;b"), vlm="tiny-random", vfm="tiny-random", device="cpu",
                        precision="fp32", compile_models=True)
        assert "without --compile" in raised.value.hint and "\n" not in str(raised.value)

    def test_a_failing_compile_is_one_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torch._dynamo.exc import TorchDynamoException

        def failing(*args, **kwargs):
            raise TorchDynamoException("backend='inductor' raised:\nInvalidCxxCompiler: no working C++ compiler\n\n"
                                       "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace")

        monkeypatch.setattr(torch, "compile", lambda function, **options: failing)
        clip = tile_step.compile_encoder(build_tiny_clip(seed=0))
        with pytest.raises(CompileError, match="torch.compile failed on .*InvalidCxxCompiler") as raised:
            clip.dense_features(torch.zeros((1, 3, 32, 32)))
        assert "without --compile" in raised.value.hint and "\n" not in str(raised.value)

    def test_torch_compile_unavailable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def unsupported(function, **options):
            raise RuntimeError("torch.compile is not supported on Python 3.99+")

        monkeypatch.setattr(torch, "compile", unsupported)
        with pytest.raises(CompileError, match="unavailable here: torch.compile is not supported"):
            tile_step.compile_encoder(build_tiny_clip(seed=0))
