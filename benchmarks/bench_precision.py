"""CPU precision: bf16 against fp32, agreement and speed, on the golden end-to-end case and full-size models.

- golden E (``../shared/golden/e2e_case1.npz``: the official code's tiny CLIP + DINOv3, two 448² images, the
  fixture's settings): the same models in fp32 and bf16 through ``tile_step`` (encoders, solver, labels);
- full size (random weights, the arithmetic of the real models): CLIP ViT-B/16 (dense, SegEarth variant λ 0.6,
  as ``bench_encoders.py``) and DINOv3 ViT-L/16 on 448² tiles cut from ../shared/data's Köln sample (random
  smooth images without it), random unit queries, the paper's solver and post-processing.

Agreement: minimum cosine fp32/bf16 of the CLIP dense tokens and of the DINOv3 features (next to the mean cosine
between different patches, which says how much a cosine of 0.9999 discriminates), max |Δ logits|, max |Δ z|,
share of identical labels. Speed: bf16/fp32 tiles/s per encoder (one warm-up call, then ``--repeats`` timed).

    .venv/bin/python benchmarks/bench_precision.py                  # both parts, batch 2 at 448²
    .venv/bin/python benchmarks/bench_precision.py --skip-speed --batch 4

bf16 runs whatever the CPU (emulated where it has no native bf16: then the speed ratio is below 1, which is why
``--precision auto`` keeps fp32 there; ``coninfer._cpu.bf16_features`` says what this CPU has).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_encoders import build_clip, measure

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
SAMPLE = ROOT.parent / "shared" / "data" / "oem_koeln_50.tif"
EXACT = ((128 / 255,) * 3, (64 / 255,) * 3)
"""Normalisation turning uint8 u into (u - 128) / 64, the golden fixtures' model input."""


def build_dinov3_l16(dtype: torch.dtype):
    """A random DINOv3 ViT-L/16 (SAT normalisation) in ``dtype``: ``.to`` rather than ``to_runtime``, which
    accepts only float32 on the CPU; the RoPE frequencies stay float32 either way (resynchronised per call)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from coninfer.encoders.dinov3 import SAT493M, DenseVFM

    config = DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             patch_size=16, num_register_tokens=4)
    return DenseVFM(DINOv3ViTModel(config), name="random-dinov3-l16", normalization=SAT493M).to(dtype=dtype)


def agreement(reference: dict, low: dict) -> dict:
    """Cosines of the features, max differences of logits and z, and label agreement, fp32 vs bf16 outputs."""
    row = {}
    for name in ("clip_tokens", "features"):
        a, b = reference[name].flatten(0, -2).float(), low[name].flatten(0, -2).float()
        row[f"{name} min cos"] = F.cosine_similarity(a, b, dim=-1).min().item()
        normed = F.normalize(a, dim=-1)
        row[f"{name} patch-patch cos"] = (normed @ normed.T).mean().item()  # the spread a cosine is read against
    row["max |Δ logits|"] = (reference["logits"] - low["logits"]).abs().max().item()
    row["max |Δ z|"] = (reference["z"] - low["z"]).abs().max().item()
    row["same patch argmax"] = (reference["z"].argmax(1) == low["z"].argmax(1)).float().mean().item()
    row["same labels"] = float(np.mean(reference["labels"] == low["labels"]))
    return row


def run_step(models, images: np.ndarray, settings, output_size: tuple[int, int], embedded=None) -> dict:
    """Encoders, solver and labels of the tile step (``infer_tiles``' calls), keeping every intermediate;
    ``embedded``: (clip_tokens, features) to solve instead of encoding."""
    from coninfer.postprocess import class_probabilities, labels_from_probabilities, patches_to_grid
    from coninfer.tile_step import as_tile_batch, embed_tiles, query_logits, solve

    tiles = as_tile_batch(images)
    with torch.inference_mode():
        clip_tokens, features = embedded or embed_tiles(models, tiles, settings)
        logits = query_logits(clip_tokens, models.query_embeddings)
        batch, patches, queries = logits.shape
        z = solve(logits.reshape(batch * patches, queries), features.reshape(batch * patches, -1), settings)
        grid = models.grid_size(settings.model_res)
        probs = class_probabilities(patches_to_grid(z.float(), grid, grid), output_size,
                                    models.classes.query_to_class, settings.post.logit_scale)
        labels = labels_from_probabilities(probs, settings.post.prob_thd, settings.post.bg_index)
    return {"clip_tokens": clip_tokens, "features": features, "logits": logits, "z": z,
            "labels": labels.to(torch.uint8).numpy()}


def golden_case() -> tuple[dict, dict]:
    """Golden E in fp32 and bf16: (our fp32 vs bf16 agreement, bf16 labels vs the official labels)."""
    from coninfer.encoders.load_clip import load_clip
    from coninfer.encoders.load_vfm import load_vfm
    from coninfer.prompts import ClassList
    from coninfer.settings import DenseCLIPSettings, InferenceSettings
    from coninfer.tile_step import Models

    with np.load(GOLDEN / "e2e_case1.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["meta_json"]))
    clip_settings = DenseCLIPSettings(meta["model_type"], meta["ignore_residual"], meta["attn_lambda"])
    heads = json.loads((GOLDEN / "clip_config.json").read_text())["heads"]
    clip = load_clip(GOLDEN / meta["clip_state_dict"], heads=heads, settings=clip_settings)
    vfm = load_vfm(GOLDEN / meta["dino_state_dict"], num_heads=meta["dino_ctor_kwargs"]["num_heads"])
    classes = ClassList.from_names([",".join(f"q{q}" for q in np.flatnonzero(arrays["query_idx"] == c))
                                    for c in range(int(arrays["query_idx"].max()) + 1)])
    queries = torch.from_numpy(arrays["query_features"])
    settings = InferenceSettings(clip=clip_settings).with_values(
        model_res=int(arrays["images_u8"].shape[-1]), temperature=meta["gmm_temp"], logit_scale=meta["logit_scale"],
        prob_thd=meta["prob_thd"], bg_index=meta["bg_idx"])
    images = np.moveaxis(arrays["images_u8"], 1, -1)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        models = Models(copy.deepcopy(clip).to(dtype=dtype), copy.deepcopy(vfm).to(dtype=dtype), classes, queries,
                        dtype=dtype, clip_normalization=EXACT, vfm_normalization=EXACT)
        outputs[dtype] = run_step(models, images, settings, tuple(meta["ori_shape"]))
    robust = ~arrays["fragile"]
    fp32_models = Models(clip, vfm, classes, queries, clip_normalization=EXACT, vfm_normalization=EXACT)
    floor = noise_floor(fp32_models, images, settings, tuple(meta["ori_shape"]), outputs[torch.float32])
    official = {"fp32 labels = official (robust px)": float(np.mean(
                    outputs[torch.float32]["labels"][robust] == arrays["pred"][robust])),
                "bf16 labels = official (robust px)": float(np.mean(
                    outputs[torch.bfloat16]["labels"][robust] == arrays["pred"][robust])),
                "bf16 max |z - z_official|": float(np.abs(outputs[torch.bfloat16]["z"].numpy() - arrays["z"]).max())}
    return {**agreement(outputs[torch.float32], outputs[torch.bfloat16]), **floor}, official


def sample_tiles(batch: int, size: int) -> np.ndarray:
    """(batch, size, size, 3) uint8: windows of the Köln sample along its diagonal, or smooth random images."""
    try:
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(SAMPLE) as src:
            step = max(0, min(src.width, src.height) - size) // max(1, batch)
            return np.stack([np.moveaxis(src.read((1, 2, 3), window=Window(i * step, i * step, size, size),
                                                  boundless=True, fill_value=0), 0, -1) for i in range(batch)])
    except Exception as error:  # noqa: BLE001 - any failure to read the sample falls back to synthetic tiles
        print(f"(sample {SAMPLE} not read: {error}; smooth random tiles instead)", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size]
    phases = rng.uniform(0, 2 * np.pi, (batch, 3, 2))
    waves = [[np.sin(rows / 23 + p[c, 0]) * np.cos(cols / 31 + p[c, 1]) for c in range(3)] for p in phases]
    return (127 + 120 * np.moveaxis(np.array(waves), 1, -1)).astype(np.uint8)


def full_size_case(batch: int, size: int, num_queries: int) -> tuple[dict, dict]:
    """Full-size random CLIP B/16 + DINOv3 L/16 in fp32 and bf16: (agreement, the models per dtype)."""
    from coninfer.prompts import ClassList
    from coninfer.settings import InferenceSettings
    from coninfer.tile_step import Models

    torch.manual_seed(0)
    clip, vfm = build_clip("cpu", torch.float32), build_dinov3_l16(torch.float32)
    queries = F.normalize(torch.randn(num_queries, clip.embed_dim, generator=torch.Generator().manual_seed(1)), dim=1)
    classes = ClassList.from_names([f"class{index}" for index in range(num_queries)])
    settings = InferenceSettings().with_values(model_res=size)
    images = sample_tiles(batch, size)
    outputs, models = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = Models(copy.deepcopy(clip).to(dtype=dtype), copy.deepcopy(vfm).to(dtype=dtype), classes,
                               queries, dtype=dtype)
        outputs[dtype] = run_step(models[dtype], images, settings, (size, size))
    rows = agreement(outputs[torch.float32], outputs[torch.bfloat16])
    return {**rows, **noise_floor(models[torch.float32], images, settings, (size, size), outputs[torch.float32])}, models


def noise_floor(models, images: np.ndarray, settings, output_size: tuple[int, int], reference: dict) -> dict:
    """The same figures for fp32 with its features rounded to float16, as the scene path's store keeps them in
    every precision: how much the solver moves for a perturbation fp32 runs already have."""
    stored = run_step(models, images, settings, output_size,
                      embedded=(reference["clip_tokens"], reference["features"].half().float()))
    floor = agreement(reference, stored)
    return {f"{key} [fp32, fp16-stored features]": floor[key] for key in ("max |Δ z|", "same patch argmax",
                                                                         "same labels")}


def speed(models: dict, batch: int, size: int, repeats: int) -> list[tuple[str, float, float]]:
    """(encoder, fp32 tiles/s, bf16 tiles/s) of the dense CLIP and DINOv3 steps."""
    rows = []
    for name, attribute in (("CLIP B/16 dense", "clip"), ("DINOv3 L/16", "vfm")):
        rates = []
        for dtype, pair in models.items():
            pixels = torch.randn(batch, 3, size, size, dtype=dtype)
            rates.append(measure(getattr(pair, attribute).dense_features, pixels, torch.device("cpu"), repeats)[0])
        rows.append((name, *rates))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="tiles per batch (full-size part)")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--queries", type=int, default=8, help="random unit queries (full-size part)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-golden", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    from coninfer._cpu import bf16_features

    print(f"CPU native bf16: {', '.join(bf16_features()) or 'none'}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    if not args.skip_golden:
        if (GOLDEN / "e2e_case1.npz").is_file():
            ours, official = golden_case()
            print("golden E (tiny official models, 2 x 448², 8 queries), bf16 vs fp32:")
            for key, value in {**ours, **official}.items():
                print(f"  {key:<36}{value:.6g}")
        else:
            print(f"golden E skipped: {GOLDEN / 'e2e_case1.npz'} not found")
    ours, models = full_size_case(args.batch, args.size, args.queries)
    print(f"full size (random CLIP B/16 + DINOv3 L/16, {args.batch} x {args.size}², {args.queries} queries), "
          "bf16 vs fp32:")
    for key, value in ours.items():
        print(f"  {key:<36}{value:.6g}")
    if not args.skip_speed:
        print(f"{'encoder, batch ' + str(args.batch) + ' x ' + str(args.size) + '²':<30}"
              f"{'fp32 tiles/s':>13}{'bf16 tiles/s':>13}{'bf16/fp32':>11}")
        for name, fp32, bf16 in speed(models, args.batch, args.size, args.repeats):
            print(f"{name:<30}{fp32:>13.3f}{bf16:>13.3f}{bf16 / fp32:>10.2f}×")


if __name__ == "__main__":
    main()
