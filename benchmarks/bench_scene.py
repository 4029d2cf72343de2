"""Scale of `coninfer segment` on synthetic scenes: tiles/s, peak RSS and how time grows with area.

Writes synthetic RGB GeoTIFFs (EPSG:25832, 0.5 m, tiled, deflate) of 5k, 10k and 20k px a side and segments each
in its own process with the tiny-random models and the default scene context (one solver run over every tile,
streamed from the on-disk store). Time per megapixel should stay flat (linear in area) and peak RSS bounded.

    python benchmarks/bench_scene.py                     # 5000 10000 20000
    python benchmarks/bench_scene.py --sizes 2000 4000   # quicker
    python benchmarks/bench_scene.py --models full-random --device cuda --batch-size 50   # real model sizes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
import torch
from coninfer.segmenter import Segmenter
from coninfer.settings import SceneOptions
scene, out, workdir, models, device, batch = sys.argv[1:7]
classes = "building,roof;road;tree;low vegetation;water"
start = time.perf_counter()
if models == "tiny":
    segmenter = Segmenter.from_presets(classes, vlm="tiny-random", vfm="tiny-random", device=device)
else:  # full-size CLIP B/16 + DINOv3 L/16 with random weights: real arithmetic, meaningless labels
    from bench_encoders import build_clip, build_dinov3
    from coninfer.tile_step import Models
    from coninfer.prompts import ClassList
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    parsed = ClassList.parse(classes)
    queries = torch.nn.functional.normalize(torch.randn(len(parsed.queries), 512), dim=-1)
    segmenter = Segmenter(Models(build_clip(device, dtype), build_dinov3(device, dtype, huge=False),
                                             parsed, queries, torch.device(device), dtype))
report = segmenter.segment_file(scene, out, SceneOptions(batch_size=int(batch)), workdir=workdir, progress=False)
report["wall_s"] = time.perf_counter() - start
report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device.startswith("cuda"):
    report["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(report))
"""


def write_scene(path: Path, side: int) -> None:
    """A cheap textured RGB scene written block by block (never whole in memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
               "crs": "EPSG:25832", "transform": from_origin(356000.0, 5650000.0, 0.5, 0.5),
               "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    block = 2048
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, side, block):
            for col in range(0, side, block):
                height, width = min(block, side - row), min(block, side - col)
                y, x = np.mgrid[row : row + height, col : col + width]
                red = ((x // 97 + y // 131) % 7) * 30 + (x % 13)
                green = ((x // 211) % 5) * 45 + (y % 17)
                blue = ((y // 59) % 3) * 80
                data = np.stack([red, green, blue]).astype(np.uint8)
                dst.write(data, window=Window(col, row, width, height))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--models", choices=["tiny", "full-random"], default="tiny",
                        help="tiny-random presets, or full-size CLIP B/16 + DINOv3 L/16 with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the scenes in (default: temporary)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for side in args.sizes:
            scene = folder / f"scene_{side}.tif"
            if not scene.exists():
                tick = time.perf_counter()
                write_scene(scene, side)
                print(f"wrote {scene.name} in {time.perf_counter() - tick:.1f} s", file=sys.stderr)
            out = folder / f"classes_{side}.tif"
            out.unlink(missing_ok=True)
            out.with_suffix(".json").unlink(missing_ok=True)
            command = [sys.executable, "-c", CHILD, str(scene), str(out), str(folder / "work"), args.models,
                       args.device, str(args.batch_size)]
            result = subprocess.run(command, check=True, capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent)
            report = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((side, report))
    base_side, base = rows[0]
    # segment_file's own total (model loading excluded): the part that must grow linearly with area
    base_rate = base["timings_s"]["total_s"] / base_side**2
    print(f"{'side px':>8}{'tiles':>7}{'scene s':>9}{'tiles/s':>9}{'encode s':>10}{'solve s':>9}{'write s':>9}"
          f"{'peak RSS MB':>13}{'s/Mpx vs first':>16}")
    for side, report in rows:
        timings = report["timings_s"]
        ratio = (timings["total_s"] / side**2) / base_rate
        print(f"{side:>8}{report['tiles']['total']:>7}{timings['total_s']:>9.1f}{report['tiles']['tiles_per_s']:>9.1f}"
              f"{timings['encode_s']:>10.1f}{timings['solve_s']:>9.1f}{timings['stitch_write_s']:>9.1f}"
              f"{report['peak_rss_mb']:>13.0f}{ratio:>16.2f}"
              + (f"  GPU peak {report['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in report else ""))


if __name__ == "__main__":
    main()
