"""Encode once, query many: a first `segment` run keeping its embeddings, then re-queries with other classes and
another temperature on the same scene, timed in one process (model loading excluded), plus the disk use.

    python benchmarks/bench_requery.py --side 10000                      # tiny-random models
    python benchmarks/bench_requery.py --side 2000 --models full-random  # CLIP B/16 + DINOv3 L/16, random weights

The re-query runs no encoder (the CLIP prior comes from the stored patch tokens), so its time is the prior,
solver, stitching and writing; the ratio is first run / re-query, both measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scene import write_scene  # noqa: E402

FIRST = "building,roof;road;tree;low vegetation;water"
OTHER = "building,roof,house;road,parking lot;tree;grass;water,river;solar panel"


def segmenter_for(classes: str, models: str, device: str, encoders=None):
    from coninfer.prompts import ClassList
    from coninfer.segmenter import Segmenter
    from coninfer.tile_step import Models

    if models == "tiny":
        return Segmenter.from_presets(classes, vlm="tiny-random", vfm="tiny-random", device=device, precision="fp32")
    from bench_encoders import build_clip, build_dinov3

    clip, vfm = encoders or (build_clip(device, torch.float32), build_dinov3(device, torch.float32, huge=False))
    parsed = ClassList.parse(classes)
    queries = torch.nn.functional.normalize(torch.randn(len(parsed.queries), 512,
                                                        generator=torch.Generator().manual_seed(0)), dim=-1)
    return Segmenter(Models(clip, vfm, parsed, queries, torch.device(device), torch.float32))


def timed(segmenter, scene: Path, out: Path, work: Path, settings=None) -> tuple[float, dict]:
    from coninfer.settings import SceneOptions

    if settings is not None:
        segmenter.settings = settings
    tick = time.perf_counter()
    report = segmenter.segment_file(scene, out, SceneOptions(), workdir=work, keep_embeddings=True, progress=False,
                                    overwrite=True)
    return time.perf_counter() - tick, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--models", choices=["tiny", "full-random"], default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        scene = folder / "scene.tif"
        write_scene(scene, args.side)
        first = segmenter_for(FIRST, args.models, args.device)
        first_s, report = timed(first, scene, folder / "first.tif", folder / "work")
        encoders = (first.models.clip, first.models.vfm)
        other = segmenter_for(OTHER, args.models, args.device, encoders)
        requery_s, requery = timed(other, scene, folder / "other.tif", folder / "work")
        warmer = other.settings.with_values(temperature=other.settings.solver.temperature * 2)
        temperature_s, _ = timed(other, scene, folder / "warmer.tif", folder / "work", warmer)
        assert requery["tiles"]["resumed_from"] == requery["tiles"]["total"], "the re-query encoded tiles"
        [work] = (folder / "work").iterdir()
        stored = sum(path.stat().st_blocks * 512 for path in work.rglob("*") if path.is_file())
    megapixels = args.side**2 / 1e6
    print(f"{args.side}² px ({megapixels:.0f} MP), {report['tiles']['total']} tiles, {args.models} models, {args.device}")
    print(f"{'run':<34}{'s':>9}{'vs first':>10}")
    for name, seconds in (("first run (encode + solve + write)", first_s), ("re-query: other classes", requery_s),
                          ("re-query: other temperature", temperature_s)):
        print(f"{name:<34}{seconds:>9.1f}{first_s / seconds:>9.1f}x")
    print(f"embeddings kept: {stored / 2**20:.0f} MiB, {stored / 2**20 / megapixels:.1f} MiB per megapixel")


if __name__ == "__main__":
    main()
