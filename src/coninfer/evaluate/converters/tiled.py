"""Converters that cut large scenes into patches: Potsdam, Vaihingen, Inria, iSAID and UAVid.

Windows follow :func:`window_starts` (a grid of ``step``, the last window shifted inward to the border). Colour-coded
labels become class indices through the palettes below (exact RGB match; other colours -> 0). Patch names carry the
window's pixel box, in the order each reference converter used:

=========  =====================  ========================  =======================================================
dataset    patch (h x w) / step   padding (image, label)    name
=========  =====================  ========================  =======================================================
Potsdam    512 x 512 / 512        none                      ``<i>_<j>_<x0>_<y0>_<x1>_<y1>.png``
Vaihingen  512 x 512 / 512        none                      ``area<N>_<x0>_<y0>_<x1>_<y1>.png``
Inria      1000 x 1000 / 1000     none                      ``<tile>_<x0>_<y0>_<x1>_<y1>.png``
iSAID      896 x 896 / 512        0, 255 up to 896          ``<P####>_<y0>_<y1>_<x0>_<x1>.png`` (+ ``_instance_color_RGB``)
UAVid      1080 x 1280 / same     0, 255 up to the patch    ``<seq>_<frame>_<y0>_<y1>_<x0>_<x1>.png``
=========  =====================  ========================  =======================================================

The ISPRS converters' stride argument (256) only sets how many windows are tried; their windows advance by the
clip size, so the effective step is 512.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from coninfer.errors import InputError, InputFileError
from coninfer.evaluate.converters._io import (
    RawFile,
    binarise,
    colour_to_index,
    encode,
    locate_root,
    missing_error,
    pad_bottom_right,
    read_gray,
    read_rgb,
    require_dir,
    scan_files,
    window_starts,
)
from coninfer.evaluate.converters._tasks import Task
from coninfer.evaluate.specs import DatasetSpec

# Patch sizes as (height, width), steps as (rows, columns). Module constants so tests can shrink them.
ISPRS_PATCH = (512, 512)
INRIA_PATCH = (1000, 1000)
ISAID_PATCH = (896, 896)
ISAID_STEP = (896 - 384, 896 - 384)
UAVID_PATCH = (1080, 1280)

POTSDAM_VAL_TILES = (
    "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13",
)  # fmt: skip
VAIHINGEN_VAL_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
INRIA_TEST_TILES = (
    "vienna3", "chicago10", "vienna20", "austin1", "tyrol-w25", "vienna9", "chicago14", "vienna18", "kitsap36",
    "kitsap35", "austin22", "kitsap34", "austin7", "vienna11", "kitsap14", "kitsap25", "austin12", "vienna15",
    "kitsap9", "austin36", "vienna6", "chicago23", "tyrol-w3", "chicago26", "austin24", "tyrol-w1", "tyrol-w36",
)  # fmt: skip

ISPRS_PALETTE = {
    (0, 0, 0): 0, (255, 255, 255): 1, (0, 0, 255): 2, (0, 255, 255): 3, (0, 255, 0): 4, (255, 255, 0): 5,
    (255, 0, 0): 6,
}  # fmt: skip
ISAID_PALETTE = {
    (0, 0, 0): 0, (0, 0, 63): 1, (0, 63, 63): 2, (0, 63, 0): 3, (0, 63, 127): 4, (0, 63, 191): 5, (0, 63, 255): 6,
    (0, 127, 63): 7, (0, 127, 127): 8, (0, 0, 127): 9, (0, 0, 191): 10, (0, 0, 255): 11, (0, 191, 127): 12,
    (0, 127, 191): 13, (0, 127, 255): 14, (0, 100, 155): 15,
}  # fmt: skip
UAVID_PALETTE = {
    (0, 0, 0): 0, (128, 0, 0): 1, (128, 64, 128): 2, (192, 0, 192): 3, (0, 128, 0): 4, (128, 128, 0): 5,
    (64, 64, 0): 6, (64, 0, 128): 3,  # moving car merged into car
}  # fmt: skip

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)
Namer = Callable[[Box], tuple[str, str]]  # box -> (image file name, label file name)


def windows(height: int, width: int, patch: tuple[int, int], step: tuple[int, int]) -> list[Box]:
    """Boxes (y0, y1, x0, x1) covering a (height, width) scene, rows outer; ends are clipped to the scene."""
    return [
        (y0, min(y0 + patch[0], height), x0, min(x0 + patch[1], width))
        for y0 in window_starts(height, patch[0], step[0])
        for x0 in window_starts(width, patch[1], step[1])
    ]


def _tile_task(
    key: str,
    image: RawFile,
    label: RawFile,
    decode_label: Callable[[RawFile], np.ndarray],
    out_dirs: tuple[Path, Path],
    patch: tuple[int, int],
    step: tuple[int, int],
    name: Namer,
    pad: bool,
) -> Task:
    """Cut one scene and its label into patches; with ``pad`` small scenes are padded (image 0, label 255)."""

    def produce() -> Iterator[tuple[Path, bytes]]:
        pixels, classes = read_rgb(image), decode_label(label)
        if pixels.shape[:2] != classes.shape:
            raise InputError(
                f"{image} is {pixels.shape[:2]} but its label {label} is {classes.shape}",
                hint="image and label must cover the same pixels; check the download",
            )
        if pad:
            pixels = pad_bottom_right(pixels, patch[0], patch[1], 0)
            classes = pad_bottom_right(classes, patch[0], patch[1], 255)
        for box in windows(classes.shape[0], classes.shape[1], patch, step):
            y0, y1, x0, x1 = box
            image_name, label_name = name(box)
            yield out_dirs[0] / image_name, encode(pixels[y0:y1, x0:x1], ".png")
            yield out_dirs[1] / label_name, encode(classes[y0:y1, x0:x1], ".png")

    return Task(key, (image, label), produce)


def _match(files: list[RawFile], pattern: str, parent: str | None = None) -> dict[str, RawFile]:
    """First file per key whose name fully matches ``pattern`` (key = the pattern's first group)."""
    regex = re.compile(pattern)
    found: dict[str, RawFile] = {}
    for raw in files:
        match = regex.fullmatch(raw.name)
        if match and (parent is None or (len(raw.parts) > 1 and raw.parts[-2] == parent)):
            found.setdefault(match.group(1), raw)
    return found


def _pairs(spec: DatasetSpec, keys, images: dict, labels: dict, what: str) -> list[tuple[str, RawFile, RawFile]]:
    layout = spec.converter.raw_layout
    missing = [f"image of {what} {k}" for k in keys if k not in images]
    missing += [f"label of {what} {k}" for k in keys if k not in labels]
    if missing:
        raise missing_error(spec.name, "files", missing, layout)
    return [(k, images[k], labels[k]) for k in keys]


def _out_dirs(spec: DatasetSpec, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / spec.layout.img_dir, out_dir / spec.layout.ann_dir


def _rgb_palette(palette: dict[tuple[int, int, int], int]) -> Callable[[RawFile], np.ndarray]:
    return lambda raw: colour_to_index(read_rgb(raw), palette)


def potsdam(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    files = scan_files(require_dir(raw_dir, spec.name, spec.converter.raw_layout), zips=True)
    images = _match(files, r"top_potsdam_(\d+_\d+)_RGB\.tif")
    labels = _match(files, r"top_potsdam_(\d+_\d+)_label_noBoundary\.tif")

    def namer(tile: str) -> Namer:
        return lambda b: (f"{tile}_{b[2]}_{b[0]}_{b[3]}_{b[1]}.png",) * 2

    return [
        _tile_task(f"tile:{tile}", image, label, _rgb_palette(ISPRS_PALETTE), _out_dirs(spec, out_dir),
                   ISPRS_PATCH, ISPRS_PATCH, namer(tile), pad=False)
        for tile, image, label in _pairs(spec, POTSDAM_VAL_TILES, images, labels, "tile")
    ]  # fmt: skip


def vaihingen(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    files = scan_files(require_dir(raw_dir, spec.name, spec.converter.raw_layout), zips=True)
    # the image archive also holds gts_for_participants/ with the same file names: take top/ only
    images = _match(files, r"top_mosaic_09cm_area(\d+)\.tif", parent="top")
    labels = _match(files, r"top_mosaic_09cm_area(\d+)_noBoundary\.tif")

    def namer(area: str) -> Namer:
        return lambda b: (f"area{area}_{b[2]}_{b[0]}_{b[3]}_{b[1]}.png",) * 2

    keys = [str(a) for a in VAIHINGEN_VAL_AREAS]
    return [
        _tile_task(f"area:{area}", image, label, _rgb_palette(ISPRS_PALETTE), _out_dirs(spec, out_dir),
                   ISPRS_PATCH, ISPRS_PATCH, namer(area), pad=False)
        for area, image, label in _pairs(spec, keys, images, labels, "area")
    ]  # fmt: skip


def inria(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    root = locate_root(raw_dir, ("images", "gt"), spec.name, spec.converter.raw_layout, prefer_name="train")
    files = scan_files(root / "images") + scan_files(root / "gt")
    images = _match([f for f in files if f.parts[-2] == "images"], r"(.+)\.tif")
    labels = _match([f for f in files if f.parts[-2] == "gt"], r"(.+)\.tif")

    def namer(tile: str) -> Namer:
        return lambda b: (f"{tile}_{b[2]}_{b[0]}_{b[3]}_{b[1]}.png",) * 2

    def decode(raw: RawFile) -> np.ndarray:
        return binarise(read_gray(raw), 128)

    return [
        _tile_task(f"tile:{tile}", image, label, decode, _out_dirs(spec, out_dir), INRIA_PATCH, INRIA_PATCH,
                   namer(tile), pad=False)
        for tile, image, label in _pairs(spec, INRIA_TEST_TILES, images, labels, "tile")
    ]  # fmt: skip


def isaid(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    layout = spec.converter.raw_layout
    files = [f for f in scan_files(require_dir(raw_dir, spec.name, layout), zips=True) if "val" in (p.lower() for p in f.parts[:-1])]
    images = _match([f for f in files if "Semantic_masks" not in f.parts], r"(P\d+)\.png")
    labels = _match(files, r"(P\d+)_instance_color_RGB\.png")
    if not images:
        raise InputFileError(f"{spec.name}: no val P####.png images found in {raw_dir}", hint=f"expected {layout}")

    def namer(scene: str) -> Namer:
        def name(b: Box) -> tuple[str, str]:
            box = f"{scene}_{b[0]}_{b[1]}_{b[2]}_{b[3]}"
            return f"{box}.png", f"{box}_instance_color_RGB.png"

        return name

    return [
        _tile_task(f"scene:{scene}", image, label, _rgb_palette(ISAID_PALETTE), _out_dirs(spec, out_dir),
                   ISAID_PATCH, ISAID_STEP, namer(scene), pad=True)
        for scene, image, label in _pairs(spec, sorted(images), images, labels, "scene")
    ]  # fmt: skip


def uavid(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    layout = spec.converter.raw_layout
    files = [f for f in scan_files(require_dir(raw_dir, spec.name, layout)) if "test_gt" in f.parts[:-1] and f.suffix == ".png" and len(f.parts) >= 3]
    images = {f"{f.parts[-3]}_{f.stem}": f for f in files if f.parts[-2] == "Images"}
    labels = {f"{f.parts[-3]}_{f.stem}": f for f in files if f.parts[-2] == "Labels"}
    if not images:
        raise InputFileError(f"{spec.name}: no test_gt/<seq>/Images/*.png in {raw_dir}", hint=f"expected {layout}")

    def namer(frame: str) -> Namer:
        return lambda b: (f"{frame}_{b[0]}_{b[1]}_{b[2]}_{b[3]}.png",) * 2

    return [
        _tile_task(f"frame:{frame}", image, label, _rgb_palette(UAVID_PALETTE), _out_dirs(spec, out_dir),
                   UAVID_PATCH, UAVID_PATCH, namer(frame), pad=True)
        for frame, image, label in _pairs(spec, sorted(images), images, labels, "frame")
    ]  # fmt: skip
