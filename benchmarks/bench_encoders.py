"""Throughput and peak memory of the CLIP and DINOv3 steps at full model size (random weights).

Builds a CLIP ViT-B/16 vision tower (the paper's dense CLIP, SegEarth variant with lambda 0.6) and a DINOv3
ViT-L/16 (and optionally ViT-H+/16) with random weights: the arithmetic is that of the real models, so the
timings are representative without downloading anything.

    python benchmarks/bench_encoders.py                       # CPU, batch 2 (a CPU is slow at ViT-L)
    python benchmarks/bench_encoders.py --device cuda --batch 50 --precision fp16 bf16 --huge
    python benchmarks/bench_encoders.py --compile --precision bf16 --repeats 3   # eager vs torch.compile

Prints tiles/s and peak memory (GPU: torch's peak allocation; CPU: process peak RSS) per step and dtype; with
``--compile`` also the same encoder compiled (``coninfer --compile``): its first call (the compile) and its rate
over eager's.
"""

from __future__ import annotations

import argparse
import resource
import time
from functools import partial

import torch


def build_clip(device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from coninfer.encoders.clip import DenseCLIP
    from coninfer.settings import DenseCLIPSettings

    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              patch_size=16, image_size=224, projection_dim=512, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(config)
    return DenseCLIP(model, settings=DenseCLIPSettings(), name="random-clip-b16").to(device=device, dtype=dtype)


def build_dinov3(device, dtype, huge: bool):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from coninfer.encoders.dinov3 import SAT493M, DenseVFM

    if huge:  # ViT-H+/16: SwiGLU, ratio 6 -> hidden 2/3 * 6 * 1280 = 5120
        config = DINOv3ViTConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, patch_size=16, num_register_tokens=4, use_gated_mlp=True,
                                 hidden_act="silu")
    else:  # ViT-L/16
        config = DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, patch_size=16, num_register_tokens=4)
    vfm = DenseVFM(DINOv3ViTModel(config), name="random-dinov3-h16plus" if huge else "random-dinov3-l16",
                   normalization=SAT493M)
    return vfm.to_runtime(device, dtype)


def measure(step, batch: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, float]:
    """(tiles/s, peak GiB) of ``step(batch)`` after one warm-up call."""
    rate, peak, _ = measure_with_warmup(step, batch, device, repeats)
    return rate, peak


def measure_with_warmup(step, batch: torch.Tensor, device: torch.device, repeats: int
                        ) -> tuple[float, float, float]:
    """(tiles/s, peak GiB, seconds of the warm-up call: a compiled step compiles there)."""
    with torch.inference_mode():
        start = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return batch.shape[0] / seconds, peak, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="tiles per batch [50 on CUDA, 2 on CPU]")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--precision", nargs="+", default=None, help="fp32 fp16 bf16 [CUDA: fp16 bf16; CPU: fp32]")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--huge", action="store_true", help="also DINOv3 ViT-H+/16")
    parser.add_argument("--compile", action="store_true", help="also each encoder torch-compiled (coninfer --compile)")
    parser.add_argument("--only", choices=["clip", "dinov3"], help="one encoder only")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch or (50 if cuda else 2)
    repeats = args.repeats or (5 if cuda else 1)
    precisions = args.precision or (["fp16", "bf16"] if cuda else ["fp32"])
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else torch.get_num_threads()} "
          f"{'GPU' if cuda else 'threads'}), batch {batch_size} x {args.size}^2, torch {torch.__version__}")
    print(f"{'step':<22}{'dtype':<7}{'tiles/s':>10}{'peak GiB':>10}")
    for precision in precisions:
        dtype = dtypes[precision]
        batch = torch.randn(batch_size, 3, args.size, args.size, device=device, dtype=dtype)
        # built one at a time, so that a compiled copy never holds a second model's weights beside it
        builders = [("CLIP B/16 dense", "clip", partial(build_clip, device, dtype)),
                    ("DINOv3 L/16", "dinov3", partial(build_dinov3, device, dtype, huge=False))]
        if args.huge:
            builders.append(("DINOv3 H+/16", "dinov3", partial(build_dinov3, device, dtype, huge=True)))
        for name, kind, build in builders:
            if args.only and kind != args.only:
                continue
            encoder = build()
            rate, peak = measure(encoder.dense_features, batch, device, repeats)
            print(f"{name:<22}{precision:<7}{rate:>10.2f}{peak:>10.2f}", flush=True)
            if args.compile:
                from coninfer.tile_step import compile_encoder

                compiled_rate, peak, compile_s = measure_with_warmup(compile_encoder(encoder).dense_features, batch,
                                                                     device, repeats)
                print(f"{'  compiled':<22}{precision:<7}{compiled_rate:>10.2f}{peak:>10.2f}   "
                      f"{compiled_rate / rate:.2f}x eager, first call (compile) {compile_s:.0f} s", flush=True)
            del encoder
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
