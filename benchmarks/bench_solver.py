"""Time coninfer.solver.refine beside a straightforward broadcast implementation of the same maths.

The reference below evaluates the log-likelihood and the variance with (chunk, K, D) broadcasts over chunks of
2500 patches, the way the official code bounds its memory. Both run in the same process on the same data.

    python benchmarks/bench_solver.py                 # CPU, N = 39200 (50 tiles x 784), D = 1024, K = 14 and 30
    python benchmarks/bench_solver.py --device cuda   # also float16 features
    python benchmarks/bench_solver.py --threads 2 --repeats 3 --queries 14

Not a test: prints a table (seconds per full solve: 11 E-steps, 10 M-steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from coninfer.solver import SolverSettings, assign, fit_context


def synthetic_problem(num_patches: int, num_queries: int, num_features: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit features (N, D) and cosine-like logits (N, K) in [0.05, 0.4]."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(num_queries, num_features, generator=generator)
    labels = torch.randint(0, num_queries, (num_patches,), generator=generator)
    features = centres[labels] + 1.5 * torch.randn(num_patches, num_features, generator=generator)
    features /= torch.linalg.vector_norm(features, dim=1, keepdim=True)
    logits = 0.2 + 0.03 * torch.randn(num_patches, num_queries, generator=generator)
    logits[torch.arange(num_patches), labels] += 0.05
    return logits.clamp(0.05, 0.4).to(device), features.to(device)


def broadcast_reference(
    logits: torch.Tensor, features: torch.Tensor, temperature: float = 50.0, iterations: int = 10, chunk: int = 2500
) -> torch.Tensor:
    """The golden-A maths written plainly, with (chunk, K, D) temporaries; float32."""
    features = features.float()
    num_features = features.shape[1]
    prior = torch.softmax(100.0 * logits, dim=1)  # (N, K)
    top = torch.topk(prior, 8, dim=0).indices  # (8, K)
    weights = prior.gather(0, top)  # (8, K)
    means = (weights.unsqueeze(2) * features[top]).sum(0) / 8  # (8, K, D) -> (K, D)
    means = means / means.norm(dim=1, keepdim=True)
    variance = torch.full((num_features,), 1.0 / num_features, device=features.device)
    for step in range(iterations + 1):
        log_likelihood = torch.cat(
            [
                -0.5 * ((part.unsqueeze(1) - means.unsqueeze(0)).square() / variance).sum(-1)  # (c, K, D) -> (c, K)
                for part in features.split(chunk)
            ]
        )
        shifted = log_likelihood - log_likelihood.amax(dim=1, keepdim=True)
        z = prior * torch.exp(shifted / temperature)
        z = z / z.sum(dim=1, keepdim=True)
        if step == iterations:
            return z
        means = (z.T @ features) / z.sum(0).unsqueeze(1)
        means = means / means.norm(dim=1, keepdim=True)
        spread = sum(
            (part_z.unsqueeze(2) * (part.unsqueeze(1) - means.unsqueeze(0)).square()).sum((0, 1))  # (c, K, D) -> (D,)
            for part, part_z in zip(features.split(chunk), z.split(chunk), strict=True)
        )
        variance = spread / z.sum()
    raise AssertionError("unreachable")


def solve(logits: torch.Tensor, features: torch.Tensor, settings: SolverSettings) -> torch.Tensor:
    """coninfer's solver through its public chunk API, with one chunk (what ``refine`` does)."""
    fit = fit_context(lambda: [(logits, features)], settings)
    return assign(logits, features, fit.state, settings)


def best_time(
    function: Callable[[], torch.Tensor], repeats: int, device: str, *, warm_up: bool = True
) -> tuple[float, torch.Tensor]:
    """Fastest of ``repeats`` runs (after one warm-up run), and the last result."""
    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patches", type=int, default=39200)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--queries", type=int, nargs="+", default=[14, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--block-rows", type=int, default=None, help="default: the solver's choice per device")
    parser.add_argument("--skip-reference", action="store_true", help="time only coninfer (the reference is slow on CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [torch.float32] + ([torch.float16] if args.device == "cuda" else [])
    settings = SolverSettings(block_rows=args.block_rows)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; N={args.patches}, D={args.features}, block_rows={settings.block_rows or 'auto'}")
    print(f"{'K':>4} {'features':>9} {'coninfer s':>11} {'broadcast s':>12} {'speed-up':>9} {'max|dz|':>9} {'argmax diff':>12}")
    for num_queries in args.queries:
        logits, features32 = synthetic_problem(args.patches, num_queries, args.features, args.device)
        for dtype in dtypes:
            features = features32.to(dtype)
            ours, z = best_time(partial(solve, logits, features, settings), args.repeats, args.device)
            row = f"{num_queries:>4} {str(dtype).removeprefix('torch.'):>9} {ours:>11.3f}"
            if args.skip_reference:
                print(row)
                continue
            theirs, z_reference = best_time(
                partial(broadcast_reference, logits, features), 1, args.device, warm_up=False
            )
            difference = (z - z_reference).abs().max().item()
            flips = int((z.argmax(1) != z_reference.argmax(1)).sum())
            print(f"{row} {theirs:>12.3f} {theirs / ours:>8.1f}x {difference:>9.1e} {flips:>12d}")


if __name__ == "__main__":
    main()
