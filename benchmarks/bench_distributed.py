"""Scale the context solver from one process to several: Gloo process groups on this CPU (coninfer.distributed).

Every world size fits one mixture over the same synthetic scene of ``--tiles`` tiles x ``--patches`` patches;
each rank holds a contiguous share of whole chunks of ``--chunk-tiles`` tiles and runs fit + final E-step on
it (the scene solve pass without the store). Times are wall seconds after a barrier, the slowest rank's.

    python benchmarks/bench_distributed.py                       # 50 tiles x 784 patches, D = 1024, K = 14
    python benchmarks/bench_distributed.py --worlds 1 2 4 --threads 1 --tiles 200

Prints, per world size N: seconds, speed-up T1 / TN, efficiency T1 / (N * TN), max |z - z_1| and the share of
patches whose label differs from world size 1. Not a test.
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


def run(world: int, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.start_processes(worker, args=(world, port, args, out), nprocs=world, start_method="spawn")
        z = np.concatenate([np.load(Path(out) / f"z-{rank}.npy") for rank in range(world)])
        return float((Path(out) / "seconds").read_text()), z


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
    args = parser.parse_args()
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
