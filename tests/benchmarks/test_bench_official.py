"""benchmarks/bench_official.py: OUR HARNESS ONLY, never the official ConInfer code.

Checked: argument parsing; the one-line errors (non-zero exit) for a missing ``--official`` path, a folder that
is not a checkout, and a dependency of the official code that does not import; and the timing / ratio plumbing
end to end on a *fake* checkout and a fake DINOv3 hub repository. The fakes are written here from scratch: tiny
modules that expose the names the script uses (``ConInferSegmentation``, ``open_clip.model.CLIP``, ``gmm``,
``mmseg.structures.SegDataSample``, a ``hubconf.py``) with trivial bodies; none of it is the official code, so
nothing here says anything about the official code's speed or behaviour.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_official.py"

FAKE_SEGMENTOR = '''
"""Fake for the harness test: the names bench_official.py uses, trivial bodies."""
from mmseg.structures import SegDataSample  # noqa: F401  (first, so that the error tests fail fast)
import gem  # noqa: F401  (stubbed by --stub-unused-imports)
from fast_pytorch_kmeans import KMeans  # noqa: F401
import types

import torch
from gmm import gmm_fitting
from open_clip import create_model


class ConInferSegmentation(torch.nn.Module):
    def __init__(self, clip_type, vit_type, model_type, name_path, device=torch.device("cuda"), **options):
        super().__init__()
        assert (model_type, options["attn_lambda"], options["feature_up"]) == ("SegEarth", 0.6, False)
        self.net = create_model(vit_type, pretrained="openai", precision="fp16")
        assert self.net.lp_dtype == torch.float16
        self.dinov3 = torch.hub.load("/nowhere/dinov3", "dinov3_vitl16", source="local",
                                     weights="/nowhere/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
        with open(name_path) as handle:
            self.num_queries = sum(len(line.split(",")) for line in handle.read().splitlines())

    def get_dino_inputs(self, data_samples):
        raise RuntimeError("the fake reads no files")

    @torch.no_grad()
    def predict(self, inputs, data_samples):
        dino = self.get_dino_inputs(data_samples).float()
        clip = self.net.encode_image(inputs.float())
        z = gmm_fitting(self.dinov3(dino).flatten(1), clip.flatten(1)[:, : self.num_queries], 50.0)
        for sample, row in zip(data_samples, z):
            labels = torch.full(sample.metainfo["ori_shape"], int(row.argmax()), dtype=torch.long)
            sample.set_data({"pred_sem_seg": types.SimpleNamespace(data=labels)})
        return data_samples
'''

FAKE_FILES = {
    "open_clip/__init__.py": '''
        def create_model(*args, **kwargs):
            raise RuntimeError("the harness must replace create_model (it would download weights)")
        ''',
    "open_clip/model.py": '''
        from dataclasses import dataclass

        import torch


        @dataclass
        class CLIPVisionCfg:
            layers: int = 12
            width: int = 768
            head_width: int = 64
            patch_size: int = 16
            image_size: int = 224


        @dataclass
        class CLIPTextCfg:
            context_length: int = 77
            vocab_size: int = 49408
            width: int = 512
            heads: int = 8
            layers: int = 12


        def get_cast_dtype(precision):
            return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


        def convert_weights_to_lp(model, dtype=torch.float16):
            model.lp_dtype = dtype


        class CLIP(torch.nn.Module):
            def __init__(self, embed_dim, vision_cfg, text_cfg, quick_gelu=False, cast_dtype=None):
                super().__init__()
                self.patches = torch.nn.Conv2d(3, embed_dim, vision_cfg.patch_size, vision_cfg.patch_size)

            def encode_image(self, image):
                return self.patches(image).mean((2, 3))
        ''',
    "open_clip/transformer.py": "",
    "gmm.py": '''
        import torch


        def gmm_fitting(dino_features, y_hat, temp, return_adapter=False):
            return torch.softmax(y_hat * temp, dim=1)
        ''',
    "configs_ConInfer/base_config2.py": "model = dict(type='ConInferSegmentation')\n",
    "mmseg/__init__.py": "",
    "mmseg/structures.py": '''
        class SegDataSample:
            def __init__(self, *, metainfo=None):
                self.metainfo = dict(metainfo or {})

            def set_data(self, data):
                for name, value in data.items():
                    setattr(self, name, value)
        ''',
}

FAKE_HUBCONF = '''
import torch


def dinov3_vitl16(*, pretrained=True, weights=None, **kwargs):
    assert not pretrained, "the harness must ask for random weights"
    assert weights == "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", weights
    return torch.nn.Conv2d(3, 4, 16, 16)


dinov3_vits16 = dinov3_vitl16
'''


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    return _write(tmp_path / "ConInfer", {"ConInfer_segmentor.py": FAKE_SEGMENTOR, **FAKE_FILES})


@pytest.fixture
def fake_dinov3(tmp_path) -> Path:
    return _write(tmp_path / "dinov3", {"hubconf.py": FAKE_HUBCONF})


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bench_official: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_official_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_defaults(script):
    args = script.parse_args(["--official", "x", "--dinov3-repo", "y"])
    assert (args.device, args.tiles, args.repeat, args.warmup, args.dtype, args.models) == (
        "cuda", 50, 5, 1, "fp16", "full")
    args = script.parse_args(["--tiles", "7", "--repeat", "2", "--dtype", "bf16", "--device", "cpu",
                              "--dino-from-files", "--stub-unused-imports"])
    assert (args.tiles, args.repeat, args.dtype, args.device) == (7, 2, "bf16", "cpu")
    assert args.dino_from_files and args.stub_unused_imports
    for bad in (["--tiles", "0"], ["--repeat", "-1"], ["--dtype", "fp8"], ["--models", "huge"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_official_path_required(script, capsys):
    assert script.main([]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "--official PATH is required" in message and "git clone" in message


def test_missing_path_is_one_line_error(tmp_path):
    line = _one_line_error(_run("--official", str(tmp_path / "absent")))
    assert "does not exist" in line and "Dog-Yang/ConInfer" in line


def test_folder_that_is_not_a_checkout(tmp_path):
    (tmp_path / "README.md").write_text("not ConInfer\n")
    line = _one_line_error(_run("--official", str(tmp_path)))
    assert "is not a ConInfer checkout" in line and "ConInfer_segmentor.py" in line and "gmm.py" in line


def test_dinov3_repo_checked(fake_checkout, tmp_path):
    assert "--dinov3-repo PATH is required" in _one_line_error(_run("--official", str(fake_checkout)))
    line = _one_line_error(_run("--official", str(fake_checkout), "--dinov3-repo", str(tmp_path)))
    assert "has no hubconf.py" in line


def test_missing_dependency_names_it_and_the_fix(tmp_path, fake_dinov3):
    files = {name: text for name, text in FAKE_FILES.items() if not name.startswith("mmseg/")}
    checkout = _write(tmp_path / "no_mmseg", {"ConInfer_segmentor.py": FAKE_SEGMENTOR, **files})
    line = _one_line_error(_run("--official", str(checkout), "--dinov3-repo", str(fake_dinov3), "--device", "cpu"))
    assert "'mmseg'" in line and "pip install mmsegmentation" in line and "requirements.txt" in line


def test_unused_import_suggests_the_stubs(fake_checkout, fake_dinov3):
    line = _one_line_error(_run("--official", str(fake_checkout), "--dinov3-repo", str(fake_dinov3),
                                "--device", "cpu"))
    assert "'gem'" in line and "--stub-unused-imports" in line


def test_timing_and_ratio_plumbing_on_a_fake_checkout(fake_checkout, fake_dinov3):
    """Both steps run on the same 2-tile batch (tiny models on our side, the fake on the other) and the report
    has both rates and their ratio. Says nothing about the official code: the checkout is a fake."""
    done = _run("--official", str(fake_checkout), "--dinov3-repo", str(fake_dinov3), "--device", "cpu",
                "--models", "tiny", "--dtype", "fp32", "--tiles", "2", "--repeat", "2", "--warmup", "1",
                "--stub-unused-imports", timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "model_type='SegEarth'" in out and "attn_lambda=0.6" in out and "fp16" in out
    assert "an unknown commit (not a git clone)" in out
    assert "labels per tile: official (512, 512), ours (512, 512)" in out
    rates = [line for line in out.splitlines() if line.endswith("tiles/s") and "2 tiles: median" in line]
    assert len(rates) == 2 and rates[0].startswith("official ConInfer predict()")
    assert rates[1].startswith("coninfer infer_labels() fp32") and "2 calls" in rates[1]
    ratio = [line for line in out.splitlines() if line.startswith("ratio ours/official: ")]
    assert len(ratio) == 1 and "tiles/s ÷" in ratio[0]
    assert float(ratio[0].split()[2].rstrip("x")) > 0


def test_dino_files_written_for_the_official_reader(script, tmp_path):
    """--dino-from-files: one PNG per tile, named as the sample's img_path, with ori_shape the tile's size."""
    import numpy as np
    from PIL import Image

    class Sample:
        def __init__(self, *, metainfo):
            self.metainfo = metainfo

    tiles = np.random.default_rng(0).integers(0, 256, (2, 24, 32, 3), dtype=np.uint8)
    samples = script.official_samples(types.SimpleNamespace(SegDataSample=Sample), tiles, tmp_path)
    assert [s.metainfo["ori_shape"] for s in samples] == [(24, 32), (24, 32)]
    for sample, tile in zip(samples, tiles, strict=True):
        assert np.array_equal(np.asarray(Image.open(sample.metainfo["img_path"])), tile)
    assert all("img_path" not in s.metainfo for s in script.official_samples(
        types.SimpleNamespace(SegDataSample=Sample), tiles, None))
