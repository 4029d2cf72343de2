"""Per-block costs of the stitch pass's output side, each against the code before, in turn in one run.

- labels of a stitched block (``raster.tiles.finalize_block``, probabilities not kept): row strips of
  ``postprocess._STRIP_PIXELS`` pixels (now) against the whole block in each pass (before: the strip set to the
  block's size);
- the report's class counts (``raster.write.count_classes``): torch's bincount of the uint8 labels (now) against
  numpy's bincount, which widens them to int64 first (before).

Blocks are the scene path's: (C + 1, 448, 2048) views of a (C + 1, 448, 4000) band (a 4000² scene's first block
of a tile row), random probabilities, every weight 1.

    .venv/bin/python benchmarks/bench_blocks.py [--classes 6] [--repeat 30]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from rasterio.windows import Window

from coninfer import postprocess
from coninfer.raster import tiles, write


def best_ms(function: Callable[[], object], repeat: int, rounds: int = 5) -> float:
    """Fastest mean of ``rounds`` rounds of ``repeat`` calls, in ms (after two warm-up calls)."""
    function(), function()
    means = []
    for _ in range(rounds):
        tick = time.perf_counter()
        for _ in range(repeat):
            function()
        means.append((time.perf_counter() - tick) / repeat * 1e3)
    return min(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)

    generator = np.random.default_rng(0)
    band = np.ones((args.classes + 1, 448, 4000), np.float32)
    band[:-1] = generator.random((args.classes, 448, 4000), dtype=np.float32)
    block, window = band[:, :, :2048], Window(0, 0, 2048, 448)
    strip = postprocess._STRIP_PIXELS

    def finalize() -> tiles.StitchedBlock:
        return tiles.finalize_block(block, window, 0.0, 0, probabilities=False)

    rows = {}
    for _turn in range(2):  # in turn: the machine's drift hits both sides alike
        for name, pixels in (("strips", strip), ("whole block", block[0].size)):
            postprocess._STRIP_PIXELS = pixels
            rows.setdefault(name, []).append(best_ms(finalize, args.repeat))
    postprocess._STRIP_PIXELS = strip
    labels = finalize().labels
    postprocess._STRIP_PIXELS = block[0].size
    assert np.array_equal(labels, finalize().labels)
    postprocess._STRIP_PIXELS = strip

    def numpy_counts() -> np.ndarray:
        return np.bincount(labels.ravel(), minlength=256)[: args.classes].astype(np.int64)

    assert np.array_equal(write.count_classes(labels, args.classes), numpy_counts())
    for _turn in range(2):
        rows.setdefault("counts, torch", []).append(best_ms(lambda: write.count_classes(labels, args.classes),
                                                            args.repeat))
        rows.setdefault("counts, numpy", []).append(best_ms(numpy_counts, args.repeat))

    best = {name: min(times) for name, times in rows.items()}
    print(f"block 448 x 2048, {args.classes} classes, 2 torch threads")
    print(f"labels (finalize_block)  strips {best['strips']:.2f} ms  whole block {best['whole block']:.2f} ms  "
          f"{best['whole block'] / best['strips']:.2f}x")
    print(f"class counts             torch {best['counts, torch']:.2f} ms  numpy {best['counts, numpy']:.2f} ms  "
          f"{best['counts, numpy'] / best['counts, torch']:.2f}x")


if __name__ == "__main__":
    main()
