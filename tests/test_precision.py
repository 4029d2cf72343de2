"""CPU precision: native-bf16 detection, what ``--precision`` resolves to on the CPU, and bf16 agreement with fp32.

The detector is monkeypatched (or forced with ``CONINFER_CPU_BF16``), so every branch runs on any CPU; bf16
arithmetic itself runs everywhere (emulated where the CPU has no native bf16), so the agreement checks do too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scenes
from coninfer import _cpu
from coninfer.encoders.tiny import build_tiny_clip, build_tiny_dinov3
from coninfer.errors import InputError
from coninfer.prompts import ClassList
from coninfer.settings import DenseCLIPSettings, InferenceSettings
from coninfer.tile_step import (
    Models,
    as_tile_batch,
    encode_tiles,
    infer_tiles,
    load_models,
    resolve_dtype,
    solve,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with scenes.one_thread():
        yield


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(_cpu.ENV_OVERRIDE, raising=False)
    detector = _cpu.bf16_features  # the cached original: tests may replace the attribute
    detector.cache_clear()
    yield
    detector.cache_clear()


def _cpu_reports(monkeypatch: pytest.MonkeyPatch, *features: str) -> None:
    monkeypatch.setattr(_cpu, "bf16_features", lambda: features)


class TestDetection:
    @pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False), ("off", False)])
    def test_override_beats_detection(self, monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
        _cpu_reports(monkeypatch, *(() if expected else ("avx512_bf16",)))
        monkeypatch.setenv(_cpu.ENV_OVERRIDE, value)
        assert _cpu.native_bf16() is expected

    def test_bad_override_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(_cpu.ENV_OVERRIDE, "maybe")
        with pytest.raises(InputError, match="CONINFER_CPU_BF16='maybe'") as error:
            _cpu.native_bf16()
        assert "CONINFER_CPU_BF16=0" in error.value.hint

    @pytest.mark.parametrize(("capabilities", "expected"), [
        ({"avx512_bf16": True, "amx_bf16": False, "avx512_bw": True}, ("avx512_bf16",)),
        ({"avx512_bf16": True, "amx_bf16": True}, ("amx_bf16", "avx512_bf16")),
        # AVX-512 without BF16: oneDNN emulates bf16 there (mkldnn says "supported"), slower than fp32
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}, ()),
        ({}, ()),
    ])  # fmt: skip
    def test_x86_flags(self, monkeypatch: pytest.MonkeyPatch, capabilities: dict, expected: tuple) -> None:
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        monkeypatch.setattr(_cpu, "_mkldnn_bf16", lambda: True)
        assert _cpu.bf16_features() == expected
        assert _cpu.native_bf16() is bool(expected)

    @pytest.mark.parametrize(("flags", "mkldnn", "expected"), [
        ({"fp", "asimd", "bf16", "sve"}, True, ("bf16",)), ({"fp", "asimd"}, True, ()), ({"bf16"}, False, ()),
    ])  # fmt: skip
    def test_arm_flags(self, monkeypatch: pytest.MonkeyPatch, flags: set, mkldnn: bool, expected: tuple) -> None:
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "aarch64")
        monkeypatch.setattr(_cpu, "_arm_features", lambda: flags)
        monkeypatch.setattr(_cpu, "_mkldnn_bf16", lambda: mkldnn)
        assert _cpu.bf16_features() == expected

    def test_other_machines_use_fp32(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "ppc64le")
        assert _cpu.bf16_features() == ()

    @pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or _cpu.platform.machine() != "x86_64",
                        reason="the kernel's x86 flags are the cross-check")
    def test_this_cpu_agrees_with_the_kernel(self) -> None:
        flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for flag in line.split(":", 1)[1].split()}
        assert set(_cpu.bf16_features()) == {"avx512_bf16", "amx_bf16"} & flags


class TestResolveDtype:
    def test_auto_is_bf16_where_native(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _cpu_reports(monkeypatch, "avx512_bf16")
        assert resolve_dtype("auto", CPU) == torch.bfloat16
        assert resolve_dtype("bf16", CPU) == torch.bfloat16
        assert resolve_dtype("fp32", CPU) == torch.float32  # the exact-parity mode stays available
        assert resolve_dtype("auto", CUDA) == torch.float16

    def test_auto_is_fp32_elsewhere(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _cpu_reports(monkeypatch)
        assert resolve_dtype("auto", CPU) == torch.float32
        assert resolve_dtype("fp32", CPU) == torch.float32
        assert resolve_dtype("bf16", CUDA) == torch.bfloat16

    def test_environment_forces_each_branch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _cpu_reports(monkeypatch, "amx_bf16")
        monkeypatch.setenv(_cpu.ENV_OVERRIDE, "0")
        assert resolve_dtype("auto", CPU) == torch.float32
        _cpu_reports(monkeypatch)
        monkeypatch.setenv(_cpu.ENV_OVERRIDE, "1")
        assert resolve_dtype("auto", CPU) == torch.bfloat16

    def test_bf16_refused_without_native_support(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _cpu_reports(monkeypatch)
        with pytest.raises(InputError) as error:
            resolve_dtype("bf16", CPU)
        message = str(error.value.args[0])
        assert "\n" not in message
        assert message.startswith("--precision bf16 is not supported on the CPU without native bf16 matmul")
        assert "AVX512-BF16" in message and error.value.hint == "use --precision fp32 (or auto) on this CPU"

    def test_fp16_refused_even_with_bf16(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _cpu_reports(monkeypatch, "avx512_bf16")
        with pytest.raises(InputError, match="fp16 is not supported on the CPU"):
            resolve_dtype("fp16", CPU)

    def test_load_models_auto_loads_bf16(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(_cpu.ENV_OVERRIDE, "1")
        models = load_models(ClassList.parse("building;road"), vlm="tiny-random", vfm="tiny-random", device="cpu",
                             cache_dir=tmp_path)
        assert models.dtype == torch.bfloat16
        assert {p.dtype for p in [*models.clip.parameters(), *models.vfm.parameters()]} == {torch.bfloat16}


def _smooth_tiles(count: int, size: int, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 of smooth patterns plus a little noise, so patches form regions."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    tiles = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        waves = [np.sin(rows / (9 + 3 * c) + phase[c]) * np.cos(cols / (11 + 2 * c)) for c in range(3)]
        tiles.append(127 + 110 * np.stack(waves, -1) + rng.integers(0, 16, (size, size, 3)))
    return np.stack(tiles).clip(0, 255).astype(np.uint8)


def _tiny_models(dtype: torch.dtype) -> Models:
    queries = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    return Models(build_tiny_clip(seed=0).to(dtype), build_tiny_dinov3(seed=0).to(dtype),
                  ClassList.parse("building,roof;road;water;tree"), queries, dtype=dtype)


class TestAgreement:
    """bf16 against fp32. Tolerances are loose bounds over what is measured: tiny models (below) cosine 0.99996,
    |Δ logits| 5e-3, |Δ z| 1.3e-5, labels identical; golden E cosine 0.9982 (DINOv3) / 0.9999 (CLIP),
    |Δ z| 0.12 on a few patches near a tie, 99.3% identical labels (benchmarks/bench_precision.py)."""

    def test_tiny_models(self) -> None:
        tiles, settings = _smooth_tiles(4, 128), InferenceSettings().with_values(model_res=128)
        (logits32, features32), (logits16, features16) = (
            encode_tiles(_tiny_models(dtype), as_tile_batch(tiles), settings) for dtype in (torch.float32, torch.bfloat16))
        assert F.cosine_similarity(features32, features16.float(), dim=-1).min() > 0.999
        assert (logits32 - logits16).abs().max() < 0.02
        batch, patches, queries = logits32.shape
        z32, z16 = (solve(logits.reshape(batch * patches, queries), features.reshape(batch * patches, -1), settings)
                    for logits, features in ((logits32, features32), (logits16, features16)))
        assert (z32 - z16).abs().max() < 1e-3
        labels32, labels16 = ([result.labels for result in infer_tiles(_tiny_models(dtype), tiles, settings)]
                              for dtype in (torch.float32, torch.bfloat16))
        assert np.mean(np.stack(labels32) == np.stack(labels16)) > 0.99

    def test_bf16_features_survive_the_float16_store(self) -> None:
        # the stores keep features as float16: exact for bf16 values down to 2**-17, and features are unit
        # vectors (|x| <= 1), far inside float16's range; what is lost below is under 2**-25 absolute
        features = F.normalize(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)), dim=1)
        low = features.to(torch.bfloat16).float().numpy()
        stored = low.astype(np.float16).astype(np.float32)
        representable = np.abs(low) >= 2.0**-17
        np.testing.assert_array_equal(stored[representable], low[representable])
        assert np.abs(stored - low).max() <= 2.0**-25

    def test_golden_end_to_end(self, golden_dir: Path) -> None:
        from coninfer.encoders.load_clip import load_clip
        from coninfer.encoders.load_vfm import load_vfm

        with np.load(golden_dir / "e2e_case1.npz", allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays["meta_json"]))
        clip_settings = DenseCLIPSettings(meta["model_type"], meta["ignore_residual"], meta["attn_lambda"])
        heads = json.loads((golden_dir / "clip_config.json").read_text())["heads"]
        clip = load_clip(golden_dir / meta["clip_state_dict"], heads=heads, settings=clip_settings)
        vfm = load_vfm(golden_dir / meta["dino_state_dict"], num_heads=meta["dino_ctor_kwargs"]["num_heads"])
        classes = ClassList.from_names([",".join(f"q{q}" for q in np.flatnonzero(arrays["query_idx"] == c))
                                        for c in range(int(arrays["query_idx"].max()) + 1)])
        exact = ((128 / 255,) * 3, (64 / 255,) * 3)  # (u8 - 128) / 64, the fixture's input
        models = Models(clip.to(torch.bfloat16), vfm.to(torch.bfloat16), classes,
                        torch.from_numpy(arrays["query_features"]), dtype=torch.bfloat16,
                        clip_normalization=exact, vfm_normalization=exact)
        settings = InferenceSettings(clip=clip_settings).with_values(
            model_res=int(arrays["images_u8"].shape[-1]), temperature=meta["gmm_temp"],
            logit_scale=meta["logit_scale"], prob_thd=meta["prob_thd"], bg_index=meta["bg_idx"])
        logits, features = encode_tiles(models, as_tile_batch(arrays["images_u8"]), settings)
        reference = torch.from_numpy(arrays["dino_feats"])
        assert F.cosine_similarity(features.float(), reference, dim=-1).min() > 0.995
        assert np.abs(logits.numpy() - arrays["clip_logits"]).max() < 0.02
        results = infer_tiles(models, np.moveaxis(arrays["images_u8"], 1, -1), settings,
                              output_sizes=[tuple(meta["ori_shape"])] * 2)
        robust = ~arrays["fragile"]
        assert np.mean(np.stack([r.labels for r in results])[robust] == arrays["pred"][robust]) > 0.98
