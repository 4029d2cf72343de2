"""Scale the context solver from one process to several: Gloo process groups on this CPU (coninfer.distributed).

Every world size fits one mixture over the same synthetic scene of ``--tiles`` tiles x ``--patches`` patches;
each rank holds a contiguous share of whole chunks of ``--chunk-tiles`` tiles and runs fit + final E-step on
it (the scene solve pass without the store). Times are wall seconds after a barrier, the slowest rank's.

    python benchmarks/bench_distributed.py                       # 50 tiles x 784 patches, D = 1024, K = 14
    python benchmarks/bench_distributed.py --worlds 1 2 4 --threads 1 --tiles 200

Prints, per world size N: seconds, speed-up T1 / TN, efficiency T1 / (N * TN), max |z - z_1| and the share of
patches whose label differs from world size 1. Not a test.

``--scene`` times the whole scene path instead (``Segmenter.segment_file``: encode, prior, solve, band stitch,
COG writes) with the tiny random models on a synthetic ``--size`` px RGB GeoTIFF, from the call to the written
class map (models loaded before the clock starts), and says whether the class map equals world size 1's::

    python benchmarks/bench_distributed.py --scene --size 2048 --tile-size 256
    python benchmarks/bench_distributed.py --scene --device cuda --worlds 1 2 4 8 --size 16384 --tile-size 448
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from coninfer import distributed
from coninfer.solver import SolverSettings, assign


def synthetic_scene(tiles: int, patches: int, queries: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit features (N, D) and cosine-like logits (N, K), the same in every process."""
    generator = torch.Generator().manual_seed(0)
    count = tiles * patches
    centres = torch.randn(queries, features, generator=generator)
    labels = torch.randint(0, queries, (count,), generator=generator)
    rows = torch.nn.functional.normalize(centres[labels] + 1.5 * torch.randn(count, features, generator=generator),
                                         dim=1)
    logits = 0.2 + 0.03 * torch.randn(count, queries, generator=generator)
    logits[torch.arange(count), labels] += 0.05
    return logits.clamp(0.05, 0.4), rows


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist = distributed.setup("cpu")
    try:
        logits, features = synthetic_scene(args.tiles, args.patches, args.queries, args.features)
        rows = args.chunk_tiles * args.patches
        starts = distributed.split(dist, list(range(0, logits.shape[0], rows)))  # whole chunks, in rank order
        first, stop = (starts[0], min(starts[-1] + rows, logits.shape[0])) if starts else (0, 0)

        def chunks():
            for start in starts:
                yield logits[start : start + rows], features[start : start + rows]

        settings = SolverSettings()
        distributed.barrier(dist)
        began = time.perf_counter()
        fit = distributed.fit_share(dist, chunks, settings, joint=True, num_patches=stop - first,
                                    num_queries=args.queries, num_features=args.features)
        z = [assign(logits[s : s + rows], features[s : s + rows], fit.state, settings) for s in starts]
        seconds = time.perf_counter() - began
        slowest = max(distributed.all_gather_tensor(dist, torch.tensor([seconds], dtype=torch.float64)))
        z_share = torch.cat(z).numpy() if z else np.zeros((0, args.queries), np.float32)
        np.save(Path(out) / f"z-{rank}.npy", z_share)
        if dist.is_main:
            (Path(out) / "seconds").write_text(str(float(slowest)))
    finally:
        distributed.teardown()


def write_scene(path: Path, size: int) -> None:
    """A smooth random (size x size) RGB GeoTIFF, 0.5 m in UTM 32N, tiled and deflated like an orthophoto."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (3, size // 32 + 2, size // 32 + 2)).astype(np.float32)
    index = np.arange(size) // 32
    pixels = coarse[:, index][:, :, index] + rng.integers(-10, 10, (3, size, size))
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:25832",
                       transform=Affine(0.5, 0, 356000, 0, -0.5, 5645000), tiled=True, compress="deflate") as dst:
        dst.write(np.clip(pixels, 0, 255).astype(np.uint8))


def scene_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from coninfer.prompts import ClassList
    from coninfer.segmenter import Segmenter
    from coninfer.settings import InferenceSettings, SceneOptions
    from coninfer.tile_step import load_models

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist = distributed.setup(args.device)  # nccl and cuda:LOCAL_RANK for cuda, gloo on the CPU
    try:
        models = load_models(ClassList.parse("building;road;tree;low vegetation;water"), vlm=args.models,
                             vfm=args.models, device=str(dist.device), precision=args.precision,
                             cache_dir=Path(out) / "text")
        segmenter = Segmenter(models, InferenceSettings().with_values(model_res=448))
        options = SceneOptions(tile_size=args.tile_size, overlap=args.tile_size // 8, batch_size=8)
        distributed.barrier(dist)
        began = time.perf_counter()
        segmenter.segment_file(Path(args.scene_path), Path(out) / "classes.tif", options, workdir=Path(out) / "work",
                               progress=False, dist=dist)
        seconds = time.perf_counter() - began
        slowest = max(distributed.all_gather_tensor(dist, torch.tensor([seconds], dtype=torch.float64)))
        if dist.is_main:
            (Path(out) / "seconds").write_text(str(float(slowest)))
    finally:
        distributed.teardown()


def run(world: int, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    """Seconds of the slowest rank and the result: z (solver) or the class map's bytes (``--scene``)."""
    with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        target = scene_worker if args.scene else worker
        mp.start_processes(target, args=(world, port, args, out), nprocs=world, start_method="spawn")
        if args.scene:
            import rasterio

            with rasterio.open(Path(out) / "classes.tif") as src:
                result = src.read(1)
        else:
            result = np.concatenate([np.load(Path(out) / f"z-{rank}.npy") for rank in range(world)])
        return float((Path(out) / "seconds").read_text()), result


def main_scene(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        args.scene_path = str(Path(folder) / "scene.tif")
        write_scene(Path(args.scene_path), args.size)
        tiles = (1 + -(-(args.size - args.tile_size) // (args.tile_size - args.tile_size // 8))) ** 2
        print(f"scene path: {args.size}^2 px, {tiles} tiles of {args.tile_size} px (overlap {args.tile_size // 8}), "
              f"{args.models} models at 448^2 ({args.precision}, {args.device}), {args.threads} thread(s) per "
              f"process, best of {args.repeats}")
        print(f"{'world':>5} {'seconds':>8} {'tiles/s':>8} {'speed-up':>8} {'efficiency':>10} {'class map':>12}")
        reference: tuple[float, np.ndarray] | None = None
        for world in args.worlds:
            seconds, labels = min((run(world, args) for _ in range(args.repeats)), key=lambda item: item[0])
            reference = reference or (seconds, labels)
            same = "identical" if np.array_equal(labels, reference[1]) else "DIFFERS"
            speedup = reference[0] / seconds
            print(f"{world:>5} {seconds:>8.2f} {tiles / seconds:>8.1f} {speedup:>8.2f} {speedup / world:>10.2f} "
                  f"{same:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiles", type=int, default=50)
    parser.add_argument("--patches", type=int, default=784, help="patches per tile (28 x 28)")
    parser.add_argument("--queries", type=int, default=14)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--chunk-tiles", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per world size")
    parser.add_argument("--scene", action="store_true", help="time the whole scene path instead of the solver")
    parser.add_argument("--size", type=int, default=2048, help="--scene: the synthetic scene's side (px)")
    parser.add_argument("--tile-size", type=int, default=256, help="--scene: tile size (px)")
    parser.add_argument("--device", default="cpu", help="--scene: cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--models", default="tiny-random", help="--scene: a preset for both encoders")
    parser.add_argument("--precision", default="fp32", help="--scene: fp32 (identical class maps), fp16, bf16")
    args = parser.parse_args()
    if args.scene:
        main_scene(args)
        return
    print(f"N = {args.tiles} x {args.patches} patches, K = {args.queries}, D = {args.features}, "
          f"{args.threads} thread(s) per process, chunks of {args.chunk_tiles} tiles, best of {args.repeats}")
    print(f"{'world':>5} {'seconds':>8} {'speed-up':>8} {'efficiency':>10} {'max |dz|':>9} {'labels differ':>13}")
    reference: tuple[float, np.ndarray] | None = None
    for world in args.worlds:
        runs = [run(world, args) for _ in range(args.repeats)]
        seconds, z = min(runs, key=lambda item: item[0])
        reference = reference or (seconds, z)
        dz = float(np.abs(z - reference[1]).max())
        differ = float((z.argmax(1) != reference[1].argmax(1)).mean())
        speedup = reference[0] / seconds
        print(f"{world:>5} {seconds:>8.3f} {speedup:>8.2f} {speedup / world:>10.2f} {dz:>9.2e} {differ:>13.2%}")


if __name__ == "__main__":
    main()
