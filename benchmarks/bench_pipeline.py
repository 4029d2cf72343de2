"""The plumbing against the models: the scene path and the eval path with null encoders, next to real models.

A *null encoder* has the encoder interface (``dense_features``, ``patch_size``, ``image_mean``/``image_std``,
``name``, ``fingerprint``) but costs next to nothing: each patch's feature is a fixed projection of its mean
colour. A run with null encoders therefore measures everything but the models (reading, resizing, the store,
the solver, stitching, COG writing): the ceiling the plumbing allows any accelerator. The same runs with the
tiny-random presets or full-size random CLIP B/16 + DINOv3 L/16 (``full-random``) show where real models sit.
``simulated`` stands in for an accelerator on a CPU-only machine: null encoders of full size (512 and 1024
channels) that also sleep ``--device-ms`` per tile, which takes no host core, so the run shows what of the host's
work overlaps the device's (``--inline-store`` adds runs with pass 1's store writes in the main thread).

- scene path: ``Segmenter.segment_file`` on a size² uint8 RGB GeoTIFF (a mosaic of ../shared/data's Köln sample,
  tiled, deflate, written once into a temporary folder), class-map COG only, 448² tiles, ``--context scene``;
- eval path: ``tile_step.infer_labels`` (what ``coninfer eval`` runs: labels only, left on the device) on batches
  of 50 448² tiles cut from the same mosaic;
- eval from files (``--paths eval-files``): ``evaluate.runner.evaluate_dataset`` over the same tiles written as a
  converted LoveDA folder (PNG images and labels), i.e. reading, decoding, the tile step and the confusion
  matrix; once with the next batch read ahead in threads (as coninfer runs) and once read serially (the code
  before), in turn, so the ratio comes from one run.

Each pass's share of the wall time is timed by wrapping the functions the passes call (the tile reader, the
encoders, the stitcher); ``model`` is the time inside the encoders, so ``1 - model`` is the share the device
waits on the plumbing.

    .venv/bin/python benchmarks/bench_pipeline.py                        # CPU, 4000², null + tiny
    .venv/bin/python benchmarks/bench_pipeline.py --device cuda --models null full-random --size 8000
    .venv/bin/python benchmarks/bench_pipeline.py --profile 25           # cProfile of the null scene run
    .venv/bin/python benchmarks/bench_pipeline.py --paths eval-files --repeat 3   # eval from PNG files
    .venv/bin/python benchmarks/bench_pipeline.py --models simulated --device-ms 3 --paths scene --inline-store

On a shared machine pass ``--repeat 3`` (the fastest scene run counts).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = "building,roof;road,parking lot;tree;low vegetation,grass;water;bare soil"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "oem_koeln_50.tif"
TILE = 448


class NullEncoder(torch.nn.Module):
    """The encoder interface at no model cost: patch features are a fixed random projection of the patch's mean
    colour, L2-normalised (so labels still vary over the scene and the solver has real work)."""

    def __init__(self, dim: int, *, patch_size: int = 16, seed: int = 0, name: str = "null") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3, dim, generator=generator))
        self.patch_size = patch_size
        self.name = f"{name}-{dim}"
        self.fingerprint = f"null:{dim}:{seed}"
        self.image_mean = (0.5, 0.5, 0.5)
        self.image_std = (0.25, 0.25, 0.25)

    def dense_features(self, pixel_values: torch.Tensor, settings=None) -> torch.Tensor:
        pooled = F.avg_pool2d(pixel_values.float(), self.patch_size)  # (B, 3, h, w)
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, h*w, 3)
        return F.normalize(tokens @ self.projection.to(tokens.device) + 0.1, dim=-1)


class SimulatedDevice(NullEncoder):
    """A null encoder of full size (CLIP B/16's 512 channels, DINOv3 L/16's 1024) whose every call also sleeps
    ``ms_per_tile`` per tile: an accelerator that works without taking a host core (a sleep releases the GIL and
    the CPU), so a run shows how much of the time such a device would wait on the host."""

    def __init__(self, dim: int, ms_per_tile: float, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.ms_per_tile = ms_per_tile

    def dense_features(self, pixel_values: torch.Tensor, settings=None) -> torch.Tensor:
        features = super().dense_features(pixel_values, settings)
        time.sleep(self.ms_per_tile * len(pixel_values) / 1000)
        return features


def build_models(kind: str, device: torch.device, device_ms: float = 1.0):
    from coninfer.prompts import ClassList
    from coninfer.tile_step import Models, load_models

    classes = ClassList.parse(CLASSES)
    if kind == "tiny":
        return load_models(classes, vlm="tiny-random", vfm="tiny-random", device=str(device), precision="fp32")
    if kind == "null":
        clip, vfm, embed = NullEncoder(32, seed=1, name="null-clip"), NullEncoder(64, seed=2, name="null-vfm"), 32
    elif kind == "simulated":  # each encoder takes half the device time
        clip = SimulatedDevice(512, device_ms / 2, seed=1, name="sim-clip")
        vfm, embed = SimulatedDevice(1024, device_ms / 2, seed=2, name="sim-vfm"), 512
    else:  # full-size CLIP B/16 + DINOv3 L/16 with random weights: real arithmetic, meaningless labels
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_encoders import build_clip, build_dinov3

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        clip, vfm, embed = build_clip(device, dtype), build_dinov3(device, dtype, huge=False), 512
        generator = torch.Generator().manual_seed(3)
        queries = F.normalize(torch.randn(len(classes.queries), embed, generator=generator), dim=-1)
        return Models(clip, vfm, classes, queries, device, dtype)
    generator = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(len(classes.queries), embed, generator=generator), dim=-1)
    return Models(clip.to(device), vfm.to(device), classes, queries, device, torch.float32)


def build_scene(folder: Path, size: int) -> Path:
    """A size² uint8 RGB GeoTIFF (512² tiles, deflate): the Köln sample repeated, cropped to size."""
    import rasterio
    from rasterio.windows import Window

    path = folder / f"mosaic_{size}.tif"
    with rasterio.open(SAMPLE) as src:
        tile, profile = src.read(), src.profile
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   interleave="pixel", bigtiff="IF_SAFER")
    side = tile.shape[1]
    repeats = -(-size // side)
    strip = np.concatenate([tile] * repeats, axis=2)[:, :, :size]
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, side):
            rows = min(side, size - top)
            dst.write(strip[:, :rows], window=Window(0, top, size, rows))
    return path


class InlineWriter:
    """pipeline.OneBehind's interface, calling at once in the caller's thread: the store writes of the code
    before the writer thread."""

    def __init__(self, name: str) -> None:
        pass

    def submit(self, function: Callable, *args) -> None:
        function(*args)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


class Timer:
    """Seconds per named part, collected by wrappers around the functions each pass calls."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, function: Callable, *, sync: bool = False) -> Callable:
        def timed(*args, **kwargs):
            tick = time.perf_counter()
            result = function(*args, **kwargs)
            if sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[part] += time.perf_counter() - tick
            return result

        return timed

    def wrap_iterator(self, part: str, function: Callable[..., Iterator]) -> Callable[..., Iterator]:
        def timed(*args, **kwargs):
            iterator = iter(function(*args, **kwargs))
            while True:
                tick = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self.seconds[part] += time.perf_counter() - tick
                    return
                self.seconds[part] += time.perf_counter() - tick
                yield item

        return timed


@contextmanager
def patched(target, name: str, value) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


@contextmanager
def model_timing(models, timer: Timer) -> Iterator[None]:
    """Time every encoder call as ``model`` (synchronised on CUDA, so the time is the device's)."""
    encoders = [model for model in (models.clip, models.vfm) if model is not None]
    for model in encoders:
        model.dense_features = timer.wrap("model", model.dense_features, sync=True)
    try:
        yield
    finally:
        for model in encoders:
            del model.dense_features


def scene_run(models, scene: Path, folder: Path, batch_size: int) -> tuple[dict, dict[str, float], float]:
    """One segment_file run; returns the report, the seconds per part and the wall time."""
    from coninfer import pipeline, segmenter
    from coninfer.segmenter import Segmenter
    from coninfer.settings import SceneOptions

    timer = Timer(models.device)
    reads = {"now": "encode"}

    @contextmanager
    def timed_reader(scene_arg):
        with pipeline.file_reader(scene_arg) as read_tile:
            def read(window):
                tick = time.perf_counter()
                result = read_tile(window)
                timer.seconds[f"read_{reads['now']}"] += time.perf_counter() - tick
                return result

            if hasattr(read_tile, "validity"):  # a file without masks: the stitch pass reads nothing
                read.validity = read_tile.validity
            yield read

    def stitch(*args, **kwargs):
        reads["now"] = "stitch"
        yield from timer.wrap_iterator("stitch", pipeline.stitch_scene)(*args, **kwargs)

    options = SceneOptions(tile_size=TILE, context="scene", batch_size=batch_size)
    out = folder / "classes.tif"
    tick = time.perf_counter()
    with patched(segmenter, "file_reader", timed_reader), patched(segmenter, "stitch_scene", stitch), \
            model_timing(models, timer):
        report = Segmenter(models).segment_file(scene, out, options, workdir=folder / "work", progress=False,
                                                 overwrite=True, resume=False)
    return report, dict(timer.seconds), time.perf_counter() - tick


def scene_parts(report: dict, seconds: dict[str, float], wall: float) -> dict[str, float]:
    """Wall time split into read, model, encode (the rest of pass 1: resizing, the store), solve, stitch and
    write (class-map COG, overviews included), plus the rest (opening, the report)."""
    timings = report["timings_s"]
    read_encode, read_stitch = seconds.get("read_encode", 0.0), seconds.get("read_stitch", 0.0)
    model = seconds.get("model", 0.0)
    stitch = seconds.get("stitch", 0.0) - read_stitch
    parts = {"read": read_encode + read_stitch, "model": model,
             "encode": timings["encode_s"] - read_encode - model, "solve": timings["solve_s"], "stitch": stitch,
             "write": timings["stitch_write_s"] - seconds.get("stitch", 0.0)}
    parts["other"] = wall - sum(parts.values())
    return parts


def eval_run(models, tiles: np.ndarray, batch: int) -> tuple[dict[str, float], float]:
    """infer_labels over ``tiles`` (N, 448, 448, 3) in batches; seconds per part (encode includes the model)."""
    from coninfer import tile_step
    from coninfer.settings import InferenceSettings

    timer = Timer(models.device)
    settings = InferenceSettings()
    tile_step.infer_labels(models, tiles[:batch], settings)  # warm-up: first-call allocations, kernels
    tick = time.perf_counter()
    with patched(tile_step, "encode_tiles", timer.wrap("encode", tile_step.encode_tiles, sync=True)), \
            patched(tile_step, "solve", timer.wrap("solve", tile_step.solve, sync=True)), model_timing(models, timer):
        for first in range(0, len(tiles), batch):
            labels = tile_step.infer_labels(models, tiles[first : first + batch], settings)
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
    del labels
    wall = time.perf_counter() - tick
    seconds = dict(timer.seconds)
    parts = {"model": seconds.get("model", 0.0), "encode": seconds.get("encode", 0.0) - seconds.get("model", 0.0),
             "solve": seconds.get("solve", 0.0)}
    parts["post"] = wall - sum(parts.values())
    return parts, wall


def write_eval_folder(tiles: np.ndarray, folder: Path) -> Path:
    """``tiles`` as a converted LoveDA dataset (img_dir/val, ann_dir/val PNGs; labels random 0..7)."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for sub in ("img_dir/val", "ann_dir/val"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / "img_dir/val" / f"{index:05d}.png")
        label = generator.integers(0, 8, tile.shape[:2], dtype=np.uint8)
        Image.fromarray(label).save(folder / "ann_dir/val" / f"{index:05d}.png")
    return folder


def eval_files_run(models, root: Path, batch: int, *, read_ahead: bool) -> tuple[float, int]:
    """(wall seconds, images) of evaluate_dataset over ``root`` with the tile step; ``read_ahead`` False reads
    each batch serially in the main thread, as the runner did before."""
    from coninfer import tile_step
    from coninfer.evaluate import runner
    from coninfer.settings import InferenceSettings

    settings = InferenceSettings()

    def serial(spec, batches):
        for batch_samples in batches:
            yield None if batch_samples is None else [runner.load_sample(spec, s) for s in batch_samples]

    tick = time.perf_counter()
    with patched(runner, "_read_ahead", runner._read_ahead if read_ahead else serial):
        result = runner.evaluate_dataset("LoveDA", root, lambda images: tile_step.infer_labels(models, images, settings),
                                         context_size=batch, progress=False)
    return time.perf_counter() - tick, result.n_images


def eval_tiles(scene: Path, count: int) -> np.ndarray:
    """``count`` 448² RGB tiles (N, H, W, 3) cut row-major from the scene (wrapping around)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(scene) as src:
        per_row = src.width // TILE
        cells = [(i % per_row, (i // per_row) % (src.height // TILE)) for i in range(count)]
        return np.stack([np.moveaxis(src.read(window=Window(c * TILE, r * TILE, TILE, TILE)), 0, -1)
                         for c, r in cells])


def fractions(parts: dict[str, float], wall: float) -> str:
    return "  ".join(f"{name} {value / wall:4.0%}" for name, value in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=4000, help="scene side in pixels [4000]")
    parser.add_argument("--tiles", type=int, default=200, help="tiles of the eval path [200]")
    parser.add_argument("--batch", type=int, default=50, help="eval-path batch (the paper's context) [50]")
    parser.add_argument("--scene-batch", type=int, default=8, help="scene-path --batch-size [8]")
    parser.add_argument("--models", nargs="+", default=["null", "tiny"],
                        choices=["null", "tiny", "full-random", "simulated"])
    parser.add_argument("--device-ms", type=float, default=1.0,
                        help="simulated: device milliseconds per tile (both encoders together) [1.0]")
    parser.add_argument("--inline-store", action="store_true",
                        help="scene: also run with pass 1's batches stored in the main thread (the code before), "
                             "in turn with the usual runs, for a ratio")
    parser.add_argument("--paths", nargs="+", default=["scene", "eval"], choices=["scene", "eval", "eval-files"])
    parser.add_argument("--repeat", type=int, default=1, help="scene runs per model; the fastest is shown [1]")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the first model's scene run and print its N costliest functions")
    args = parser.parse_args()
    device = torch.device(args.device)
    from coninfer import pipeline

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        scene = build_scene(folder, args.size)
        tiles = eval_tiles(scene, args.tiles) if {"eval", "eval-files"} & set(args.paths) else None
        root = write_eval_folder(tiles, folder / "loveda") if "eval-files" in args.paths else None
        for number, kind in enumerate(args.models):
            models = build_models(kind, device, args.device_ms)
            if "scene" in args.paths:
                profiler = cProfile.Profile() if args.profile and number == 0 else None
                if profiler:
                    profiler.enable()
                modes = ["", "inline-store"] if args.inline_store else [""]
                runs = {mode: [] for mode in modes}
                for _ in range(args.repeat):
                    for mode in modes:
                        with patched(pipeline, "OneBehind", InlineWriter) if mode else nullcontext():
                            runs[mode].append(scene_run(models, scene, folder, args.scene_batch))
                if profiler:
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
                for mode in modes:
                    report, seconds, wall = min(runs[mode], key=lambda run: run[2])
                    count = report["tiles"]["total"]
                    print(f"scene {kind:<11} {args.size}² {count} tiles  {wall:6.2f} s  {count / wall:7.1f} tiles/s  "
                          f"{fractions(scene_parts(report, seconds, wall), wall)}  pass 1 "
                          f"{report['timings_s']['encode_s']:.2f} s {mode}", flush=True)
            if root is not None:
                eval_files_run(models, root, args.batch, read_ahead=True)  # warm-up: page cache, first calls
                runs = {True: [], False: []}
                for _ in range(args.repeat):
                    for ahead in (True, False):
                        runs[ahead].append(eval_files_run(models, root, args.batch, read_ahead=ahead))
                (ahead_wall, count), (serial_wall, _) = min(runs[True]), min(runs[False])
                print(f"eval-files {kind:<6} {count} PNG x {TILE}² in {args.batch}s  read ahead {ahead_wall:6.2f} s "
                      f"{count / ahead_wall:7.1f} img/s   serial {serial_wall:6.2f} s {count / serial_wall:7.1f} img/s"
                      f"   ({serial_wall / ahead_wall:.2f}x)", flush=True)
            if tiles is not None and "eval" in args.paths:
                parts, wall = eval_run(models, tiles, args.batch)
                print(f"eval  {kind:<11} {len(tiles)} x {TILE}² in {args.batch}s  {wall:6.2f} s  "
                      f"{len(tiles) / wall:7.1f} tiles/s  {fractions(parts, wall)}", flush=True)


if __name__ == "__main__":
    main()
