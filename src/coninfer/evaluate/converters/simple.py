"""Converters that copy files and, for the single-class datasets, binarise the labels.

Copy-only: OpenEarthMap (val.txt selection), LoveDA (Val Urban + Rural), UDD5 and VDD (used as released).
Binary: WHU_Aerial, WHU_Sat_II, xBD_pre, CHN6-CUG, DeepGlobe, Massachusetts, SpaceNet and WBS-SI read each mask as
grayscale and write 1 where it is >= a threshold (128; xBD: 1), 0 elsewhere, under the name the loaders expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from coninfer.errors import InputError, InputFileError
from coninfer.evaluate.converters._io import (
    RawFile,
    binarise,
    encode,
    list_dir,
    locate_root,
    missing_error,
    read_gray,
    require_dir,
    scan_files,
)
from coninfer.evaluate.converters._tasks import Task, copy_task, map_task
from coninfer.evaluate.specs import DatasetSpec


def _raw(path: Path, base: Path) -> RawFile:
    return RawFile(path, path.relative_to(base.parent).parts)


def openearthmap(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    """Copy the val.txt images of OpenEarthMap_wo_xBD (``<region>/images``) and their ``labels`` twins."""
    layout = spec.converter.raw_layout
    root = locate_root(raw_dir, ("val.txt",), spec.name, layout, prefer_name="OpenEarthMap_wo_xBD")
    lines = [line.strip() for line in (root / "val.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    wanted = [name if name.endswith(".tif") else name + ".tif" for name in lines]
    images = {p.name: p for p in sorted(root.rglob("*.tif")) if p.parent.name == "images"}
    missing = [name for name in wanted if name not in images]
    if missing:
        raise missing_error(spec.name, "images listed in val.txt", missing, layout)
    labels = {name: images[name].parent.parent / "labels" / name for name in wanted}
    missing = [str(path) for path in labels.values() if not path.is_file()]
    if missing:
        raise missing_error(spec.name, "labels", missing, layout)
    tasks = []
    for name in wanted:
        tasks.append(copy_task(_raw(images[name], root), out_dir / spec.layout.img_dir / name))
        tasks.append(copy_task(_raw(labels[name], root), out_dir / spec.layout.ann_dir / name))
    return tasks


def loveda(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    """Copy Val/{Urban,Rural}/images_png and masks_png (from Val.zip or the extracted folder) into one folder."""
    layout = spec.converter.raw_layout
    found: dict[str, dict[str, RawFile]] = {"images_png": {}, "masks_png": {}}
    regions: dict[str, str] = {}
    for raw in scan_files(require_dir(raw_dir, spec.name, layout), zips=True):
        folder_parts = [p.lower() for p in raw.parts[:-1]]
        if "val" not in folder_parts or raw.suffix != ".png" or raw.parts[-2] not in found or len(raw.parts) < 3:
            continue
        region = raw.parts[-3]
        if raw.name in regions and regions[raw.name] != region:
            raise InputError(
                f"{spec.name}: {raw.name} exists in both {regions[raw.name]} and {region}",
                hint="Urban and Rural file names must not collide; check the download",
            )
        regions[raw.name] = region
        found[raw.parts[-2]].setdefault(raw.name, raw)  # an archive and its extracted copy: keep one
    images, masks = found["images_png"], found["masks_png"]
    if not images:
        raise InputFileError(f"{spec.name}: no Val/*/images_png/*.png in {raw_dir}", hint=f"expected {layout}")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise missing_error(spec.name, "masks_png files for", missing, layout)
    tasks = []
    for name in sorted(images):
        tasks.append(copy_task(images[name], out_dir / spec.layout.img_dir / name))
        tasks.append(copy_task(masks[name], out_dir / spec.layout.ann_dir / name))
    return tasks


def _check_index_label(spec: DatasetSpec, label: Path) -> None:
    with Image.open(label) as image:
        mode = image.mode
    if mode not in ("L", "P"):
        raise InputError(
            f"{spec.name}: label {label} is a {mode} image, not an index map",
            hint=f"the benchmark expects {spec.label_encoding.stored_values}",
        )


def as_released(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    """UDD5, VDD: the release is already in the evaluation layout; check the pairs and copy them."""
    layout, img_dir, ann_dir = spec.converter.raw_layout, spec.layout.img_dir, spec.layout.ann_dir
    root = locate_root(raw_dir, (img_dir, ann_dir), spec.name, layout, prefer_name=Path(spec.layout.root).name)
    images = list_dir(root / img_dir, (spec.layout.img_suffix,))
    if not images:
        raise InputFileError(f"{spec.name}: no *{spec.layout.img_suffix} images in {root / img_dir}", hint=f"expected {layout}")
    labels = [root / ann_dir / (image.name[: -len(spec.layout.img_suffix)] + spec.layout.ann_suffix) for image in images]
    missing = [str(p) for p in labels if not p.is_file()]
    if missing:
        raise missing_error(spec.name, "labels", missing, layout)
    _check_index_label(spec, labels[0])
    tasks = []
    for image, label in zip(images, labels, strict=True):
        tasks.append(copy_task(image, out_dir / img_dir / image.name))
        tasks.append(copy_task(_raw(label, root / ann_dir), out_dir / ann_dir / label.name))
    return tasks


@dataclass(frozen=True)
class BinaryLayout:
    """Raw layout of a single-class dataset: ``<images>/<id><image_ending>`` and ``<labels>/<id><label_ending>``."""

    images: str
    labels: str
    image_ending: str
    label_ending: str
    threshold: int = 128
    name_contains: str | None = None
    split_file: str | None = None


BINARY_LAYOUTS = {
    "WHU_Aerial": BinaryLayout("val/image", "val/label", ".tif", ".tif"),
    "WHU_Sat_II": BinaryLayout("test/image", "test/label", ".tif", ".tif"),
    "xBD_pre": BinaryLayout("test/images", "test/targets", ".png", "_target.png", threshold=1, name_contains="pre_disaster"),
    "CHN6-CUG": BinaryLayout("val/images", "val/gt", "_sat.jpg", "_mask.png"),
    "DeepGlobe": BinaryLayout("img", "gt", "_sat.jpg", "_mask.png"),
    "Massachusetts": BinaryLayout("img", "gt", ".jpg", ".png"),
    "SpaceNet": BinaryLayout("img", "gt", ".jpg", ".png"),
    "WBS-SI": BinaryLayout("Images", "Masks", ".jpg", ".jpg", split_file="wbs-si_val.txt"),
}


def _split_ids(spec: DatasetSpec, split_file: str, root: Path, raw_dir: Path) -> tuple[list[str], RawFile]:
    for folder in (root, Path(raw_dir)):
        path = folder / split_file
        if path.is_file():
            ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return ids, _raw(path, folder)
    raise InputFileError(
        f"{spec.name}: split file {split_file} not found in {root} or {raw_dir}",
        hint=f"copy tools/dataset_converters/{split_file} of SegEarth-OV into RAW_DIR (it lists the evaluated stems)",
    )


def _binary_label(threshold: int, suffix: str):
    def transform(raw: RawFile) -> bytes:
        return encode(binarise(read_gray(raw), threshold), suffix)

    return transform


def binary(spec: DatasetSpec, raw_dir: Path, out_dir: Path) -> list[Task]:
    """Copy the images and write 0/1 labels (gray >= threshold) under ``<id><ann_suffix>``."""
    raw = BINARY_LAYOUTS[spec.name]
    layout = spec.converter.raw_layout
    root = locate_root(raw_dir, (raw.images, raw.labels), spec.name, layout, prefer_name=Path(spec.layout.root).name)
    images = {f.name[: -len(raw.image_ending)]: f for f in list_dir(root / raw.images, (raw.image_ending,))}
    if raw.name_contains is not None:
        images = {i: f for i, f in images.items() if raw.name_contains in i}
    tasks = []
    if raw.split_file is not None:
        ids, split = _split_ids(spec, raw.split_file, root, raw_dir)
        missing = [i + raw.image_ending for i in ids if i not in images]
        if missing:
            raise missing_error(spec.name, f"images listed in {raw.split_file}", missing, layout)
        images = {i: images[i] for i in ids}
        tasks.append(copy_task(split, out_dir / spec.layout.split_file))
    if not images:
        raise InputFileError(
            f"{spec.name}: no *{raw.image_ending} images in {root / raw.images}", hint=f"expected {layout}"
        )
    labels = {i: root / raw.labels / (i + raw.label_ending) for i in images}
    missing = [str(p) for p in labels.values() if not p.is_file()]
    if missing:
        raise missing_error(spec.name, "labels", missing, layout)
    transform = _binary_label(raw.threshold, spec.layout.ann_suffix)
    for image_id, image in sorted(images.items()):
        tasks.append(copy_task(image, out_dir / spec.layout.img_dir / (image_id + spec.layout.img_suffix)))
        label = _raw(labels[image_id], root / raw.labels)
        tasks.append(map_task(label, out_dir / spec.layout.ann_dir / (image_id + spec.layout.ann_suffix), transform))
    return tasks
