"""Tile-step throughput of the official ConInfer code against coninfer's, on one batch, in one process.

What it measures: the paper's tile step, 50 tiles of 512² in one batch as the context (the Potsdam config: 8
queries in 6 classes, ``prob_thd`` 0.1, ``bg_idx`` 5), with random weights at full model size on both sides:

- official: ``ConInferSegmentation.predict`` of the user's checkout, i.e. its own dense CLIP ViT-B/16 (its
  ``open_clip`` fork's attention surgery, ``model_type='SegEarth'``, ``ignore_residual=True``,
  ``attn_lambda=0.6``: the ConInfer setting of ``configs_ConInfer/base_config2.py``), its DINOv3 ViT-L/16
  (SAT-493M variant, built by the DINOv3 repository's own hub entry ``dinov3_vitl16``), its ``gmm_fitting``
  and its ``postprocess_result`` (labels at the original 512²), all in float16 as that code hard-codes;
- ours: ``coninfer.tile_step.infer_labels`` on the same tiles (uint8, host memory), with the full-size random
  CLIP B/16 and DINOv3 L/16 of ``benchmarks/bench_encoders.py`` in ``--dtype``.

Printed: tiles/s of each (tiles ÷ the median seconds of one call; calls alternate between the two sides after
a warm-up of each, with ``torch.cuda.synchronize`` around every timed call) and the ratio
ours tiles/s ÷ official tiles/s.

    .venv/bin/python benchmarks/bench_official.py --official ../ConInfer --dinov3-repo ../dinov3 \\
        --device cuda --tiles 50 --repeat 5

``--official`` is the root of a clone of https://github.com/Dog-Yang/ConInfer with its requirements installed
(mmsegmentation, mmengine, mmcv, ...: its ``ConInfer_segmentor.py`` imports them), ``--dinov3-repo`` a clone of
https://github.com/facebookresearch/dinov3: the official code loads DINOv3 with
``torch.hub.load(<local dinov3 clone>, 'dinov3_vitl16', source='local', weights=...)`` from a folder outside
its repository. coninfer ships none of that code: this script puts the two folders on ``sys.path`` and calls
them.

How the official model is built without downloads: its own ``ConInferSegmentation.__init__`` runs with the
config's arguments; while it runs, the two weight loads it makes are redirected: ``create_model('ViT-B/16',
pretrained='openai', precision='fp16')`` (a download of the OpenAI weights) gets the same architecture built
from the checkout's own ``open_clip.model.CLIP`` with random weights (QuickGELU, weights cast with its
``convert_weights_to_lp`` as for the OpenAI weights), and the DINOv3 hub load from the authors' absolute paths
goes to ``--dinov3-repo`` with ``pretrained=False`` (random weights; the SAT-493M weight file name is passed on
so the hub entry builds that variant). Its text tower embeds the class prompts in ``__init__`` as usual.
Nothing is downloaded; nothing of the timing depends on the weights' values.

What the official timing leaves out: its input pipeline (mmseg's file reading and ``Resize`` to 448², its
``SegDataPreProcessor`` normalisation, and the PIL read of each tile for DINOv3 in ``get_dino_inputs``: replaced
by a DINOv3 batch prepared on the device; ``--dino-from-files`` times that PIL path too, from PNG files). Ours
includes the host-to-device copy and the resize of the 512² uint8 tiles, so the ratio does not favour ours.

``--stub-unused-imports`` replaces with empty modules what ``ConInfer_segmentor.py`` imports but the core step
never calls (``BLIP``, ``gem``, ``simfeatup_dev``, ``fast_pytorch_kmeans``), for an environment where they do not
import (e.g. the BLIP code under the transformers >= 4.56 coninfer needs; the official requirements pin 4.55.4).
``--models tiny`` builds small random models on both sides (a wiring smoke test in seconds, not a benchmark).

Written against the official repository at commit f91823e6ab7872b3016ec85a299490f5be32b32e, from reading its
code. It has NOT been run against a real checkout on a GPU here: this workplace has no GPU and no checkout of
the official code; only the harness (argument and checkout checks, errors, the timing and ratio plumbing on a
fake checkout written for the test) is tested, by tests/benchmarks/test_bench_official.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

WRITTEN_AGAINST = "f91823e6ab7872b3016ec85a299490f5be32b32e"
OFFICIAL_URL = "https://github.com/Dog-Yang/ConInfer"
DINOV3_URL = "https://github.com/facebookresearch/dinov3"
# the files of the official checkout this script relies on (their absence: not a checkout)
CHECKOUT_FILES = ("ConInfer_segmentor.py", "gmm.py", "open_clip/model.py", "open_clip/transformer.py",
                  "configs_ConInfer/base_config2.py")
# the Potsdam config (configs_ConInfer/cfg_potsdam.py): its class file's layout, prob_thd and bg_idx
CLASS_LINES = ("road,parking lot", "building", "low vegetation", "tree", "car", "clutter,background")
PROB_THD, BG_IDX = 0.1, 5
TILE, MODEL_RES = 512, 448
# ConInferSegmentation's arguments: the ConInfer block of configs_ConInfer/base_config2.py + cfg_potsdam.py
OFFICIAL_KWARGS = dict(clip_type="CLIP", vit_type="ViT-B/16", model_type="SegEarth", ignore_residual=True,
                       prob_thd=PROB_THD, gmm_temp=50.0, attn_lambda=0.6, dataset_type="PotsdamDataset",
                       logit_scale=5, slide_stride=0, slide_crop=0, cls_token_lambda=0, bg_idx=BG_IDX,
                       feature_up=False)
# pip names of modules the official code imports (pins from its requirements.txt where it has one)
PIP_NAMES = {"mmseg": "mmsegmentation==1.2.2", "mmengine": "mmengine==0.10.7", "mmcv": "'mmcv>=2.1.0'",
             "torchvision": "torchvision", "fast_pytorch_kmeans": "fast-pytorch-kmeans==0.2.2",
             "cv2": "opencv-python", "timm": "timm==1.0.19", "einops": "einops", "kornia": "kornia",
             "ftfy": "ftfy", "regex": "regex", "PIL": "pillow", "sklearn": "scikit-learn",
             "matplotlib": "matplotlib", "omegaconf": "omegaconf", "hydra": "hydra-core",
             "fairscale": "fairscale", "pykeops": "pykeops", "pydensecrf": "pydensecrf", "yaml": "pyyaml"}
# what ConInfer_segmentor.py imports that predict() never calls: module -> the names taken from it
UNUSED_IMPORTS = {"BLIP.models.blip_retrieval": ("blip_retrieval",), "gem": ("create_gem_model",),
                  "simfeatup_dev.upsamplers": ("get_upsampler",), "fast_pytorch_kmeans": ("KMeans",)}
# packages that are folders of the official repository itself (ConInfer_segmentor.py imports them)
OFFICIAL_PACKAGES = ("open_clip", "prompts", "BLIP", "gem", "simfeatup_dev")
DTYPE_NAMES = ("fp16", "bf16", "fp32")


class HarnessError(Exception):
    """A problem with the inputs or the environment, reported as one line (exit status 2)."""


# --------------------------------------------------------------------------------------------- checks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, help="root of a clone of Dog-Yang/ConInfer")
    parser.add_argument("--dinov3-repo", type=Path, help="root of a clone of facebookresearch/dinov3 "
                        "(the official code loads DINOv3 from a local clone with torch.hub)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiles", type=_positive, default=50, help="tiles in the batch (the context) [50]")
    parser.add_argument("--repeat", type=_positive, default=5, help="timed calls of each side [5]")
    parser.add_argument("--warmup", type=_positive, default=1, help="untimed calls of each side first [1]")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16",
                        help="our models' dtype [fp16]; the official code runs in fp16 whatever this says")
    parser.add_argument("--models", choices=("full", "tiny"), default="full",
                        help="full-size random models [full], or small ones (a wiring smoke test)")
    parser.add_argument("--dino-from-files", action="store_true",
                        help="let the official predict() read each tile for DINOv3 from a PNG (its PIL path)")
    parser.add_argument("--stub-unused-imports", action="store_true",
                        help="empty modules for BLIP, gem, simfeatup_dev, fast_pytorch_kmeans (unused by predict)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_checkout(path: Path | None) -> Path:
    """The official checkout's root, or a one-line HarnessError naming what is wrong and the fix."""
    if path is None:
        raise HarnessError(f"--official PATH is required: the root of a clone of {OFFICIAL_URL} "
                           f"(git clone {OFFICIAL_URL}; coninfer ships none of its code)")
    path = path.expanduser().resolve()
    if not path.exists():
        raise HarnessError(f"--official {path} does not exist: pass the root of a clone of {OFFICIAL_URL}")
    if not path.is_dir():
        raise HarnessError(f"--official {path} is not a folder: pass the root of a clone of {OFFICIAL_URL}")
    missing = [name for name in CHECKOUT_FILES if not (path / name).is_file()]
    if missing:
        raise HarnessError(f"--official {path} is not a ConInfer checkout ({', '.join(missing)} missing): "
                           f"pass the root of a clone of {OFFICIAL_URL}")
    return path


def check_dinov3_repo(path: Path | None) -> Path:
    if path is None:
        raise HarnessError(f"--dinov3-repo PATH is required: the official code loads DINOv3 with torch.hub.load "
                           f"from a local clone of {DINOV3_URL} (git clone {DINOV3_URL})")
    path = path.expanduser().resolve()
    if not (path / "hubconf.py").is_file():
        raise HarnessError(f"--dinov3-repo {path} has no hubconf.py: pass the root of a clone of {DINOV3_URL}")
    return path


def checkout_commit(path: Path) -> str | None:
    """The checkout's HEAD commit (None when it is not a git clone or git is absent)."""
    if not (path / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _missing_module_message(error: ModuleNotFoundError, folder: Path, what: str, stub_hint: bool) -> str:
    name = error.name or str(error)
    top = name.split(".")[0]
    unused = _unused_import_behind(error, folder) if stub_hint else None
    stub_fix = f"pass --stub-unused-imports ({unused} is imported but never called by predict())" if unused else ""
    official = what.startswith("the official")
    if (folder / top).exists() or (folder / f"{top}.py").exists() or (official and top in OFFICIAL_PACKAGES):
        message = f"{what} cannot import {name!r}, which should be part of {folder} ({error})"
        return f"{message}; fix: {stub_fix}" if unused else f"{message}: is the clone complete?"
    fix = f"pip install {PIP_NAMES.get(top, top)}"
    if official:
        fix += f" (all of them: pip install -r {folder / 'requirements.txt'})"
    if unused:
        fix += f", or {stub_fix}"
    return f"{what} needs the module {top!r}, which is not importable here ({error}); fix: {fix}"


def _unused_import_behind(error: BaseException, folder: Path) -> str | None:
    """The import of ConInfer_segmentor.py that predict() never calls (UNUSED_IMPORTS) during which ``error``
    was raised, from the error's module name or the files in its traceback; None if none."""
    tops = {dotted.split(".")[0] for dotted in UNUSED_IMPORTS}
    name = getattr(error, "name", None) or ""
    if name.split(".")[0] in tops:
        return name.split(".")[0]
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename)
        for top in tops:
            if (folder / top) in path.parents or f"{os.sep}{top}{os.sep}" in frame.filename:
                return top
    return None


@contextlib.contextmanager
def _inside(folder: Path):
    """``folder`` first on sys.path and as the working directory (the official code resolves some paths
    against both), restored afterwards."""
    previous = Path.cwd()
    sys.path.insert(0, str(folder))
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _install_stubs() -> None:
    """Empty modules for the official imports the core step never calls; their functions raise if called."""
    def unavailable(*_args, **_kwargs):
        raise RuntimeError("stubbed by bench_official.py --stub-unused-imports")

    for dotted, names in UNUSED_IMPORTS.items():
        parts = dotted.split(".")
        for depth in range(1, len(parts) + 1):
            module_name = ".".join(parts[:depth])
            module = sys.modules.get(module_name)
            if module is None:
                module = types.ModuleType(module_name)
                if depth < len(parts):
                    module.__path__ = []
                sys.modules[module_name] = module
                if depth > 1:
                    setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1], module)
        for name in names:
            setattr(sys.modules[dotted], name, unavailable)


def import_official(checkout: Path, *, stub_unused: bool = False):
    """(ConInfer_segmentor, open_clip.model, mmseg.structures) of the checkout, or a one-line HarnessError."""
    if stub_unused:
        _install_stubs()
    with _inside(checkout):
        try:
            segmentor = importlib.import_module("ConInfer_segmentor")
            clip_model = importlib.import_module("open_clip.model")
            structures = importlib.import_module("mmseg.structures")
        except ModuleNotFoundError as error:
            raise HarnessError(_missing_module_message(error, checkout, "the official code", not stub_unused)
                               ) from error
        except ImportError as error:
            unused = None if stub_unused else _unused_import_behind(error, checkout)
            hint = f"; fix: pass --stub-unused-imports ({unused} is imported but never called by predict())" \
                if unused else ""
            raise HarnessError(f"importing the official code failed: {error}{hint}") from error
    for owner, names in ((segmentor, ("ConInferSegmentation",)),
                         (clip_model, ("CLIP", "CLIPVisionCfg", "CLIPTextCfg", "get_cast_dtype",
                                       "convert_weights_to_lp"))):
        absent = [name for name in names if not hasattr(owner, name)]
        if absent:
            raise HarnessError(f"{owner.__file__} has no {', '.join(absent)}: this script was written against "
                               f"commit {WRITTEN_AGAINST} of {OFFICIAL_URL}")
    for method in ("predict", "get_dino_inputs"):
        if not hasattr(segmentor.ConInferSegmentation, method):
            raise HarnessError(f"ConInferSegmentation has no {method}(): this script was written against "
                               f"commit {WRITTEN_AGAINST} of {OFFICIAL_URL}")
    return segmentor, clip_model, structures


# --------------------------------------------------------------------------------------------- models


def official_clip_factory(clip_model, tiny: bool):
    """A stand-in for the checkout's ``create_model``: the architecture asked for (OpenAI ViT-B/16: QuickGELU,
    text tower 512 wide) built from the checkout's own ``CLIP`` class with random weights, cast as
    ``precision`` asks; ``pretrained`` (a download) is ignored."""
    def create_model(model_name, pretrained=None, precision="fp32", **_kwargs):
        if tiny:
            vision = clip_model.CLIPVisionCfg(layers=12, width=64, head_width=16, patch_size=16, image_size=224)
            text = clip_model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
            embed_dim = 32
        else:
            vision = clip_model.CLIPVisionCfg(layers=12, width=768, head_width=64, patch_size=16, image_size=224)
            text = clip_model.CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
            embed_dim = 512
        cast_dtype = clip_model.get_cast_dtype(precision)
        model = clip_model.CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True, cast_dtype=cast_dtype)
        if cast_dtype is not None:
            clip_model.convert_weights_to_lp(model, dtype=cast_dtype)
        return model.eval()

    return create_model


def official_hub_load(dinov3_repo: Path, tiny: bool):
    """A stand-in for ``torch.hub.load`` while the official ``__init__`` runs: the entry it asks for from
    ``dinov3_repo`` with random weights (``dinov3_vits16`` for ``--models tiny``)."""
    import torch

    real_load = torch.hub.load

    def hub_load(_repo_or_dir, model, *args, weights=None, **kwargs):
        kwargs.pop("source", None)
        entry = "dinov3_vits16" if tiny else model
        if weights is not None:  # its file name names the variant (SAT-493M: hash eadcf0ff); nothing is read
            kwargs["weights"] = Path(str(weights)).name
        try:
            return real_load(str(dinov3_repo), entry, *args, source="local", pretrained=False, **kwargs)
        except ModuleNotFoundError as error:
            raise HarnessError(_missing_module_message(error, dinov3_repo, "the DINOv3 clone's hubconf.py", False)
                               ) from error
        except RuntimeError as error:  # torch.hub's check of the hubconf's ``dependencies`` list
            if "Missing dependencies" not in str(error):
                raise
            raise HarnessError(f"the DINOv3 clone's hubconf.py: {error}; fix: pip install them") from error

    return hub_load


def build_official(segmentor, clip_model, dinov3_repo: Path, name_path: Path, device, tiny: bool):
    """The official ``ConInferSegmentation`` built by its own ``__init__`` with the config's arguments, its two
    weight loads redirected to random weights (see the module docstring)."""
    from unittest import mock

    import torch

    kwargs = dict(OFFICIAL_KWARGS, name_path=str(name_path), device=device)
    with mock.patch.object(segmentor, "create_model", official_clip_factory(clip_model, tiny)), \
            mock.patch.object(torch.hub, "load", official_hub_load(dinov3_repo, tiny)):
        try:
            return segmentor.ConInferSegmentation(**kwargs)
        except TypeError as error:
            raise HarnessError(f"the official ConInferSegmentation does not take the arguments of commit "
                               f"{WRITTEN_AGAINST[:7]} ({error}): is the checkout at another commit?") from error


def build_ours(device, dtype, tiny: bool):
    """coninfer's ``Models``: the full-size random CLIP B/16 and DINOv3 L/16 of bench_encoders.py (or the
    tiny-random test models), random unit query embeddings for the Potsdam classes."""
    import torch
    import torch.nn.functional as F

    from coninfer.prompts import ClassList
    from coninfer.tile_step import Models

    if tiny:
        from coninfer.encoders.tiny import build_tiny_clip, build_tiny_dinov3

        clip = build_tiny_clip().to(device=device, dtype=dtype)
        vfm = build_tiny_dinov3().to_runtime(device, dtype)
        embed = 32
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_encoders import build_clip, build_dinov3

        clip, vfm, embed = build_clip(device, dtype), build_dinov3(device, dtype, huge=False), 512
    classes = ClassList.from_names(CLASS_LINES)
    generator = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(len(classes.queries), embed, generator=generator), dim=-1)
    return Models(clip, vfm, classes, queries, device, dtype)


# --------------------------------------------------------------------------------------------- inputs


def official_inputs(tiles, device):
    """The batch as the official predict() receives it: CLIP pixels resized to 448² and normalised with its
    SegDataPreProcessor's statistics (the OpenAI CLIP ones), and the DINOv3 batch its get_dino_inputs would
    make (448², SAT-493M statistics), both float16 on the device."""
    import torch
    import torch.nn.functional as F

    from coninfer.encoders.normalization import OPENAI_CLIP, SAT493M

    pixels = torch.from_numpy(tiles).permute(0, 3, 1, 2).to(device).float() / 255
    pixels = F.interpolate(pixels, size=(MODEL_RES, MODEL_RES), mode="bilinear", align_corners=False)

    def normalised(stats):
        mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).half()

    return normalised(OPENAI_CLIP), normalised(SAT493M)


def official_samples(structures, tiles, folder: Path | None):
    """One SegDataSample per tile (``ori_shape`` 512²); with ``folder``, each tile written there as a PNG and
    named as its ``img_path`` (read by the official get_dino_inputs)."""
    samples = []
    for index, tile in enumerate(tiles):
        metainfo = {"ori_shape": tuple(tile.shape[:2]), "img_shape": (MODEL_RES, MODEL_RES)}
        if folder is not None:
            from PIL import Image

            path = folder / f"tile_{index:03d}.png"
            Image.fromarray(tile).save(path)
            metainfo["img_path"] = str(path)
        samples.append(structures.SegDataSample(metainfo=metainfo))
    return samples


# --------------------------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: dict, device, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Seconds of each timed call of each step: ``warmup`` untimed calls of each first, then the steps called in
    turn ``repeat`` times, each call between two device synchronisations."""
    for step in steps.values():
        for _ in range(warmup):
            step()
        _sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def tiles_per_second(tiles: int, seconds: list[float]) -> float:
    return tiles / statistics.median(seconds)


def report(name: str, tiles: int, seconds: list[float]) -> str:
    return (f"{name:<44} {tiles} tiles: median {statistics.median(seconds):.3f} s/call "
            f"(min {min(seconds):.3f}, {len(seconds)} calls) = {tiles_per_second(tiles, seconds):.2f} tiles/s")


# --------------------------------------------------------------------------------------------- main


def run(args, checkout: Path, dinov3_repo: Path) -> int:
    segmentor, clip_model, structures = import_official(checkout, stub_unused=args.stub_unused_imports)
    import numpy as np
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda but torch sees no CUDA device: run on a machine with a GPU "
                           "(the official gmm_fitting calls .cuda())")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tiny = args.models == "tiny"

    from coninfer.settings import InferenceSettings
    from coninfer.tile_step import infer_labels

    commit = checkout_commit(checkout)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}; official checkout {checkout} at "
          f"{commit or 'an unknown commit (not a git clone)'} (written against {WRITTEN_AGAINST[:7]})")
    if commit and commit != WRITTEN_AGAINST:
        print(f"note: the checkout is not at {WRITTEN_AGAINST[:7]}; the script may not match its code")
    if args.dtype != "fp16":
        print(f"note: ours runs in {args.dtype}, the official code in fp16 (its predict() casts to half)")
    arguments = ", ".join(f"{key}={value!r}" for key, value in OFFICIAL_KWARGS.items())
    print(f"official model: ConInferSegmentation({arguments}), random weights"
          + (" (tiny models)" if tiny else ""))

    torch.manual_seed(args.seed)
    tiles = np.random.default_rng(args.seed).integers(0, 256, (args.tiles, TILE, TILE, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="bench_official_") as scratch:
        folder = Path(scratch)
        name_path = folder / "cls_potsdam_like.txt"
        name_path.write_text("\n".join(CLASS_LINES) + "\n")
        official = build_official(segmentor, clip_model, dinov3_repo, name_path, device, tiny)
        models = build_ours(device, dtype, tiny)
        settings = InferenceSettings().with_values(prob_thd=PROB_THD, bg_index=BG_IDX)

        clip_input, dino_input = official_inputs(tiles, device)
        samples = official_samples(structures, tiles, folder if args.dino_from_files else None)
        if not args.dino_from_files:  # the DINOv3 batch prepared on the device instead of read from files
            official.get_dino_inputs = lambda _data_samples: dino_input
        outputs = {}

        def official_step():
            outputs["official"] = official.predict(clip_input, samples)

        def our_step():
            outputs["ours"] = infer_labels(models, tiles, settings)

        steps = {"official ConInfer predict()": official_step, f"coninfer infer_labels() {args.dtype}": our_step}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_alternating(steps, device, args.warmup, args.repeat)
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (both sides' models resident)" \
            if device.type == "cuda" else ""
    official_shape = tuple(outputs["official"][0].pred_sem_seg.data.shape[-2:])  # PixelData holds (1, H, W)
    our_shape = tuple(outputs["ours"][0].shape)
    print(f"labels per tile: official {official_shape}, ours {our_shape}{peak}")
    for name, times in seconds.items():
        print(report(name, args.tiles, times))
    official_rate, our_rate = (tiles_per_second(args.tiles, times) for times in seconds.values())
    print(f"ratio ours/official: {our_rate / official_rate:.2f}x  "
          f"({our_rate:.2f} tiles/s ÷ {official_rate:.2f} tiles/s)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkout = check_checkout(args.official)
        dinov3_repo = check_dinov3_repo(args.dinov3_repo)
        return run(args, checkout, dinov3_repo)
    except HarnessError as error:
        print(f"bench_official: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
