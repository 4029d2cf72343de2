"""CUDA check: golden parity of every stage on the GPU in fp32 / fp16 / bf16, and pipeline throughput.

Run on a machine with a GPU, with the golden folder at ``--golden`` (default ../shared/golden):

    python benchmarks/gpu_check.py --golden ../shared/golden

Prints, per stage and dtype, the largest deviation from the golden fixtures (computed on CPU in float32 by the
paper's code), label agreement of the end-to-end path, the time of the full tile step (dense CLIP B/16 +
DINOv3 L/16 + solver + post-processing) for a 50-tile batch with full-size random-weight models, eager and with
both encoders torch-compiled (``--compile``; ``--skip-compile`` leaves that out), and the host-to-GPU copy of a
50-tile batch (uint8 through pinned memory, non-blocking, against float32 made on the host) and the eval's
confusion matrix of a 50-image batch counted on the device against numpy on the host.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")


def golden_clip(golden: Path, device) -> None:
    from coninfer.encoders.load_clip import load_clip
    from coninfer.settings import DenseCLIPSettings

    data = np.load(golden / "clip_dense_outputs.npz", allow_pickle=False)
    config = json.loads(str(data["config_json"]))
    x = torch.from_numpy((data["images_u8"].astype(np.float32) - 128) / 64)
    names = {"vanilla": "vanilla", "MaskCLIP": "maskclip", "SCLIP": "sclip", "ClearCLIP": "clearclip",
             "SegEarth": "segearth"}
    for precision, dtype in DTYPES.items():
        clip = load_clip(golden / "clip_visual_state_dict.safetensors", heads=config["heads"], device=device,
                         dtype=dtype)
        worst, worst_cos = 0.0, 1.0
        for setting in config["settings"]:
            if setting["output_cls_token"]:
                continue
            settings = DenseCLIPSettings(names[setting["model_type"]], setting["ignore_residual"],
                                         setting["attn_lambda"])
            with torch.inference_mode():
                tokens = clip.dense_tokens(x.to(device, dtype), settings).float().cpu()
            expected = torch.from_numpy(data[f"tokens__{setting['key']}"])
            worst = max(worst, (tokens - expected).abs().max().item())
            worst_cos = min(worst_cos, torch.cosine_similarity(tokens, expected, dim=-1).min().item())
        print(f"golden C  dense CLIP (10 settings) {precision}: max abs {worst:.2e}, min cosine {worst_cos:.6f}")


def golden_dinov3(golden: Path, device) -> None:
    from coninfer.encoders.load_vfm import load_vfm

    for name in ("dinov3_vitl16sat_tiny", "dinov3_vith16plus_tiny"):
        data = np.load(golden / f"{name}_outputs.npz", allow_pickle=False)
        x = torch.from_numpy((data["images_u8"].astype(np.float32) - 128) / 64)
        expected = torch.nn.functional.normalize(torch.from_numpy(data["x_norm_patchtokens"]), dim=-1)
        for precision, dtype in DTYPES.items():
            heads = json.loads((golden / f"{name}_config.json").read_text())["DinoVisionTransformer_kwargs"]["num_heads"]
            vfm = load_vfm(golden / f"{name}_state_dict.safetensors", num_heads=heads, device=device, dtype=dtype)
            with torch.inference_mode():
                features = vfm.dense_features(x.to(device, dtype)).float().cpu()
            error = (features - expected).abs().max().item()
            cosine = torch.cosine_similarity(features, expected, dim=-1).min().item()
            print(f"golden D  {name} {precision}: max abs (unit features) {error:.2e}, min cosine {cosine:.6f}")


def golden_solver(golden: Path, device) -> None:
    from coninfer.solver import refine

    data = np.load(golden / "gmm_case3_N39200_D1024_K9.npz", allow_pickle=False)
    features = (data["feat_A"].astype(np.float32) @ data["feat_W"].astype(np.float32)) / data["feat_norms"][:, None]
    logits = torch.from_numpy(data["clip_logits"]).to(device)
    expected = data["z"]
    for precision in DTYPES:
        feats = torch.from_numpy(features).to(device, DTYPES[precision])
        refine(logits, feats)
        _sync(device)
        start = time.perf_counter()
        z = refine(logits, feats, temperature=float(data["temp"]))
        _sync(device)
        seconds = time.perf_counter() - start
        z = z.cpu().numpy()
        agree = (z.argmax(1) == expected.argmax(1)).mean()
        print(f"golden A  solver case 3 (N=39200, D=1024, K=9) {precision} features: max abs z "
              f"{np.abs(z - expected).max():.2e}, argmax agreement {agree:.5f}, {seconds * 1000:.1f} ms")


def golden_end_to_end(golden: Path, device) -> None:
    from coninfer.encoders.load_clip import load_clip
    from coninfer.encoders.load_vfm import load_vfm
    from coninfer.prompts import ClassList
    from coninfer.settings import DenseCLIPSettings, InferenceSettings
    from coninfer.tile_step import Models, infer_tiles

    data = np.load(golden / "e2e_case1.npz", allow_pickle=False)
    meta = json.loads(str(data["meta_json"]))
    names = {"SegEarth": "segearth", "MaskCLIP": "maskclip", "SCLIP": "sclip", "ClearCLIP": "clearclip",
             "vanilla": "vanilla"}
    clip_settings = DenseCLIPSettings(names[meta["model_type"]], meta["ignore_residual"], meta["attn_lambda"])
    query_idx = data["query_idx"].tolist()
    lines = [",".join(f"q{q}" for q, c in enumerate(query_idx) if c == cls) for cls in range(max(query_idx) + 1)]
    classes = ClassList.from_names(lines)
    settings = InferenceSettings(clip=clip_settings).with_values(
        temperature=meta["gmm_temp"], logit_scale=meta["logit_scale"], prob_thd=meta["prob_thd"],
        bg_index=meta["bg_idx"])
    unit = ((128 / 255,) * 3, (64 / 255,) * 3)
    images = np.moveaxis(data["images_u8"], 1, -1)
    size = tuple(meta["ori_shape"])
    for precision, dtype in DTYPES.items():
        clip_heads = json.loads((golden / "clip_config.json").read_text())["heads"]
        clip = load_clip(golden / meta["clip_state_dict"], heads=clip_heads, settings=clip_settings,
                         device=device, dtype=dtype)
        vfm = load_vfm(golden / meta["dino_state_dict"], num_heads=meta["dino_ctor_kwargs"]["num_heads"], device=device,
                       dtype=dtype)
        models = Models(clip, vfm, classes, torch.from_numpy(data["query_features"]), torch.device(device), dtype,
                        clip_normalization=unit, vfm_normalization=unit)
        results = infer_tiles(models, images, settings, output_sizes=[size] * len(images))
        labels = np.stack([r.labels for r in results])
        keep = ~data["fragile"]
        agree = (labels[keep] == data["pred"][keep]).mean()
        print(f"golden E  end to end {precision}: label agreement outside fragile {agree:.6f}")


def host_to_device(device, batch: int, repeats: int = 5) -> None:
    """A batch of 448² uint8 tiles to the device as the tile step sends it (stack_on_device: uint8, pinned,
    non-blocking, float on the device) against the code before (stack, then ``.to(device, float32)``, which
    converts on the host and copies four times the bytes, from pageable memory)."""
    from coninfer.tile_step import stack_on_device

    target = torch.device(device)
    tiles = list(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, 448, 448), dtype=np.uint8)))
    ways = {"float32 from pageable (before)": lambda: torch.stack(tiles).to(device=target, dtype=torch.float32),
            "uint8 pinned, non-blocking (now)": lambda: stack_on_device(tiles, target).float()}
    seconds = {}
    for name, copy in ways.items():
        copy()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            pixels = copy()
        _sync(device)
        seconds[name] = (time.perf_counter() - start) / repeats
        print(f"host to device {name}: {batch} x 448² -> {seconds[name] * 1000:.1f} ms per batch")
    before, now = seconds.values()
    same = torch.equal(ways["float32 from pageable (before)"](), pixels)
    print(f"host to device: {before / now:.2f}x faster now, identical pixels {same}")


def confusion(device, batch: int, repeats: int = 5) -> None:
    """The eval's confusion matrix of a batch of 512² label maps held on the device (as the tile step leaves
    them): counted there with torch (one (C+1)² copy back) against the labels copied to the host and counted with
    numpy (the code before); the two matrices must be equal."""
    from coninfer.evaluate.metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 7, (512, 512), dtype=np.uint8) for _ in range(batch)]  # 6 classes, 6 = ignored
    target = torch.device(device)
    predictions = [torch.from_numpy(rng.integers(0, 6, (512, 512), dtype=np.uint8)).to(target) for _ in range(batch)]
    matrices = {}
    pairs = list(zip(predictions, labels, strict=True))
    ways = {"host numpy (before)": lambda m: [m.update(p.cpu().numpy(), g) for p, g in pairs],
            "device torch (now)": lambda m: m.update_many(pairs)}
    for name, count in ways.items():
        count(ConfusionMatrix(6, ignore_index=6))
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            matrices[name] = ConfusionMatrix(6, ignore_index=6)
            count(matrices[name])
        _sync(device)
        print(f"confusion {name}: {batch} x 512² -> {(time.perf_counter() - start) / repeats * 1000:.1f} ms per batch")
    before, now = matrices.values()
    print(f"confusion: matrices identical {np.array_equal(before.matrix, now.matrix)}")


def throughput(device, batch: int, compiled: bool = True) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, DINOv3ViTConfig, DINOv3ViTModel

    from coninfer.encoders.clip import DenseCLIP
    from coninfer.encoders.dinov3 import SAT493M, DenseVFM
    from coninfer.prompts import ClassList
    from coninfer.settings import InferenceSettings
    from coninfer.tile_step import Models, infer_labels, infer_tiles

    clip_config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, patch_size=16, image_size=224, projection_dim=512,
                                   hidden_act="quick_gelu")
    vfm_config = DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, patch_size=16, num_register_tokens=4)
    classes = ClassList.parse("building,roof;road,parking lot;tree;low vegetation;car;clutter,background")
    images = np.random.default_rng(0).integers(0, 256, (batch, 512, 512, 3), dtype=np.uint8)
    for precision in [p for p in DTYPES if p != "fp32"] or ["fp32"]:
        dtype = DTYPES[precision]
        clip = DenseCLIP(CLIPVisionModelWithProjection(clip_config), name="random-b16").to(device, dtype)
        vfm = DenseVFM(DINOv3ViTModel(vfm_config), name="random-l16", normalization=SAT493M).to_runtime(device,
                                                                                                      dtype)
        queries = torch.nn.functional.normalize(torch.randn(len(classes.queries), 512), dim=-1)
        models = Models(clip, vfm, classes, queries, torch.device(device), dtype)
        # infer_tiles brings labels and probabilities to the host; infer_labels (the eval's) keeps labels there
        for method, step in (("baseline", infer_tiles), ("coninfer", infer_tiles), ("coninfer", infer_labels)):
            settings = InferenceSettings().with_values(method=method)
            step(models, images[:4], settings)
            _sync(device)
            start = time.perf_counter()
            step(models, images, settings)
            _sync(device)
            seconds = time.perf_counter() - start
            print(f"tile step {method:<8} {step.__name__:<12} {precision}: {batch} tiles 512² -> {seconds:.2f} s, "
                  f"{batch / seconds:.1f} tiles/s, peak {_peak_gib(device):.1f} GiB")
        if compiled:
            try:
                compiled_throughput(models, images, precision, device)
            except Exception as error:  # a compile failure must not hide the other figures
                print(f"tile step compiled {precision} FAILED: {type(error).__name__}: {error}")
        del clip, vfm, models
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def compiled_throughput(models, images, precision: str, device) -> None:
    """The coninfer tile step with both encoders compiled (``--compile``): the compile (the first call, on the
    full batch, so one shape compiles) and the rate after it; labels against the eager run's."""
    from coninfer.settings import InferenceSettings
    from coninfer.tile_step import compile_encoder, infer_tiles

    settings = InferenceSettings()
    eager = infer_tiles(models, images, settings)
    compile_encoder(models.clip)
    compile_encoder(models.vfm)
    start = time.perf_counter()
    infer_tiles(models, images, settings)
    _sync(device)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    results = infer_tiles(models, images, settings)
    _sync(device)
    seconds = time.perf_counter() - start
    agree = np.mean([(r.labels == e.labels).mean() for r, e in zip(results, eager, strict=True)])
    print(f"tile step compiled {precision}: first call (compile) {compile_s:.0f} s, then {len(images) / seconds:.1f} "
          f"tiles/s, labels identical to eager {agree:.5f}, peak {_peak_gib(device):.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--throughput-only", action="store_true", help="skip the golden checks")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), help="subset of fp32 fp16 bf16")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile row (it compiles for minutes)")
    args = parser.parse_args()
    device = args.device
    for name in set(DTYPES) - set(args.precisions):
        DTYPES.pop(name)
    name = torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}")
    for check in () if args.throughput_only else (golden_solver, golden_clip, golden_dinov3, golden_end_to_end):
        try:
            check(args.golden, device)
        except Exception as error:  # keep going: one failing stage must not hide the others
            print(f"{check.__name__} FAILED: {type(error).__name__}: {error}")
    for check in (host_to_device, confusion):
        try:
            check(device, args.batch)
        except Exception as error:
            print(f"{check.__name__} FAILED: {type(error).__name__}: {error}")
    throughput(device, args.batch, compiled=not args.skip_compile)


if __name__ == "__main__":
    main()
