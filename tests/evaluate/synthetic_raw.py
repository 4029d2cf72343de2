"""Tiny synthetic downloads of the 17 benchmarks, in their original layouts, with the converted files we expect.

Each builder writes a raw folder and returns ``Expected``: output path (relative to OUT_DIR) -> either the exact
bytes (files the converter copies) or the decoded array (files it re-encodes). Expectations are computed here from
the dataset descriptions (palettes, thresholds, window rules, names), independently of coninfer's converter code.
Tiled datasets are built for patch sizes the tests set on ``coninfer.evaluate.converters.tiled`` (``TINY_PATCHES``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Expected = dict[str, "bytes | np.ndarray"]

# patch sizes (h, w) and steps used with the tiled converters in tests (monkeypatched module constants)
TINY_PATCHES = {
    "ISPRS_PATCH": (8, 8),
    "INRIA_PATCH": (4, 4),
    "ISAID_PATCH": (8, 8),
    "ISAID_STEP": (5, 5),
    "UAVID_PATCH": (4, 6),
}

ISPRS_COLOURS = {  # from the spec: RGB -> index before reduce_zero_label
    (0, 0, 0): 0, (255, 255, 255): 1, (0, 0, 255): 2, (0, 255, 255): 3, (0, 255, 0): 4, (255, 255, 0): 5,
    (255, 0, 0): 6,
}  # fmt: skip
ISAID_COLOURS = {
    (0, 0, 0): 0, (0, 0, 63): 1, (0, 63, 63): 2, (0, 63, 0): 3, (0, 63, 127): 4, (0, 63, 191): 5, (0, 63, 255): 6,
    (0, 127, 63): 7, (0, 127, 127): 8, (0, 0, 127): 9, (0, 0, 191): 10, (0, 0, 255): 11, (0, 191, 127): 12,
    (0, 127, 191): 13, (0, 127, 255): 14, (0, 100, 155): 15,
}  # fmt: skip
UAVID_COLOURS = {
    (0, 0, 0): 0, (128, 0, 0): 1, (128, 64, 128): 2, (192, 0, 192): 3, (0, 128, 0): 4, (128, 128, 0): 5,
    (64, 64, 0): 6, (64, 0, 128): 3,
}  # fmt: skip
ODD_COLOUR = (10, 20, 30)  # in no palette: must become 0

POTSDAM_VAL = ["2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13"]
VAIHINGEN_VAL = [2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38]
INRIA_TEST = [
    "vienna3", "chicago10", "vienna20", "austin1", "tyrol-w25", "vienna9", "chicago14", "vienna18", "kitsap36",
    "kitsap35", "austin22", "kitsap34", "austin7", "vienna11", "kitsap14", "kitsap25", "austin12", "vienna15",
    "kitsap9", "austin36", "vienna6", "chicago23", "tyrol-w3", "chicago26", "austin24", "tyrol-w1", "tyrol-w36",
]  # fmt: skip


# --- encoding helpers ------------------------------------------------------------------------------------------


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def colour_label(rng: np.random.Generator, h: int, w: int, palette: dict) -> tuple[np.ndarray, np.ndarray]:
    """(colour image, expected index map): random palette colours plus a few unknown colours (-> 0)."""
    colours = list(palette) + [ODD_COLOUR]
    choice = rng.integers(0, len(colours), (h, w))
    image = np.array(colours, dtype=np.uint8)[choice]
    index = np.array([palette.get(c, 0) for c in colours], dtype=np.uint8)[choice]
    return image, index


def binary_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """0..255 gray values, so thresholding at 128 is exercised on both sides."""
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def starts(length: int, size: int, step: int) -> list[int]:
    """Window starts per the spec: k*step while inside, the window crossing the border moved inward, no duplicates."""
    if length <= size:
        return [0]
    result = []
    k = 0
    while k * step < length:
        start = k * step if k * step + size <= length else length - size
        if start not in result:
            result.append(start)
        k += 1
    return sorted(result)


def pad(array: np.ndarray, h: int, w: int, value: int) -> np.ndarray:
    out_h, out_w = max(h, array.shape[0]), max(w, array.shape[1])
    out = np.full((out_h, out_w) + array.shape[2:], value, dtype=array.dtype)
    out[: array.shape[0], : array.shape[1]] = array
    return out


def gray_mask(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    stored = binary_mask(rng, 5, 7)
    return stored, (stored >= 128).astype(np.uint8)


def damage_levels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """xBD targets: 0 background, 1..4 building damage levels; every value >= 1 is building."""
    stored = rng.integers(0, 5, (5, 7), dtype=np.uint8)
    return stored, (stored >= 1).astype(np.uint8)


def colour_mask(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A colour mask is read as grayscale (luma 0.299 R + 0.587 G + 0.114 B) before thresholding at 128."""
    colours = np.array([(255, 0, 0), (255, 255, 0), (0, 0, 255), (255, 255, 255), (0, 255, 0), (0, 0, 0)], np.uint8)
    luma = colours.astype(float) @ np.array([0.299, 0.587, 0.114])  # 76, 226, 29, 255, 150, 0: far from 128
    choice = rng.integers(0, len(colours), (5, 7))
    return colours[choice], (luma[choice] >= 128).astype(np.uint8)


# --- builders --------------------------------------------------------------------------------------------------


def openearthmap(raw: Path, rng: np.random.Generator) -> Expected:
    root = raw / "OpenEarthMap_wo_xBD"
    (root / "val.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "val.txt").write_text("aachen_1.tif\nkyoto_2.tif\n")
    expected: Expected = {}
    for region, name, listed in [("aachen", "aachen_1.tif", True), ("aachen", "aachen_3.tif", False), ("kyoto", "kyoto_2.tif", True)]:
        image = write(root / region / "images" / name, encoded(rgb(rng, 5, 6), "TIFF"))
        label = write(root / region / "labels" / name, encoded(rng.integers(0, 9, (5, 6), dtype=np.uint8), "TIFF"))
        if listed:
            expected[f"img_dir/val/{name}"] = image
            expected[f"ann_dir/val/{name}"] = label
    return expected


def loveda(raw: Path, rng: np.random.Generator) -> Expected:
    members, expected = {}, {}
    for region, name in [("Urban", "3514.png"), ("Urban", "3515.png"), ("Rural", "2522.png")]:
        image, label = encoded(rgb(rng, 4, 5), "PNG"), encoded(rng.integers(0, 8, (4, 5), dtype=np.uint8), "PNG")
        members[f"Val/{region}/images_png/{name}"] = image
        members[f"Val/{region}/masks_png/{name}"] = label
        expected[f"img_dir/val/{name}"], expected[f"ann_dir/val/{name}"] = image, label
    write_zip(raw / "Val.zip", members)
    write_zip(raw / "Train.zip", {"Train/Urban/images_png/1.png": encoded(rgb(rng, 4, 5), "PNG"),
                                  "Train/Urban/masks_png/1.png": encoded(np.zeros((4, 5), np.uint8), "PNG")})  # fmt: skip
    return expected


def _tiles(expected: Expected, image: np.ndarray, index: np.ndarray, patch, step, name, dirs, pad_label=None):
    if pad_label is not None:
        image, index = pad(image, *patch, 0), pad(index, *patch, pad_label)
    h, w = index.shape
    for y0 in starts(h, patch[0], step[0]):
        for x0 in starts(w, patch[1], step[1]):
            y1, x1 = min(y0 + patch[0], h), min(x0 + patch[1], w)
            image_name, label_name = name(y0, y1, x0, x1)
            expected[f"{dirs[0]}/{image_name}"] = image[y0:y1, x0:x1]
            expected[f"{dirs[1]}/{label_name}"] = index[y0:y1, x0:x1]


def isaid(raw: Path, rng: np.random.Generator) -> Expected:
    expected: Expected = {}
    images = {}
    for scene, (h, w) in [("P0001", (12, 20)), ("P0002", (6, 9))]:
        image = rgb(rng, h, w)
        colour, index = colour_label(rng, h, w, ISAID_COLOURS)
        images[f"images/{scene}.png"] = encoded(image, "PNG")
        write(raw / "val" / "Semantic_masks" / "images" / f"{scene}_instance_color_RGB.png", encoded(colour, "PNG"))

        def name(y0, y1, x0, x1, scene=scene):
            box = f"{scene}_{y0}_{y1}_{x0}_{x1}"
            return f"{box}.png", f"{box}_instance_color_RGB.png"

        _tiles(expected, image, index, TINY_PATCHES["ISAID_PATCH"], TINY_PATCHES["ISAID_STEP"], name, ("img_dir/val", "ann_dir/val"), pad_label=255)
    write_zip(raw / "val" / "images" / "part1.zip", images)
    write_zip(raw / "train" / "images" / "part1.zip", {"images/P0009.png": encoded(rgb(rng, 4, 4), "PNG")})
    return expected


def _isprs_scene(rng: np.random.Generator, expected: Expected, name) -> tuple[bytes, bytes]:
    image = rgb(rng, 10, 12)
    colour, index = colour_label(rng, 10, 12, ISPRS_COLOURS)
    _tiles(expected, image, index, TINY_PATCHES["ISPRS_PATCH"], TINY_PATCHES["ISPRS_PATCH"], name, ("img_dir/val", "ann_dir/val"))
    return encoded(image, "TIFF"), encoded(colour, "TIFF")


def potsdam(raw: Path, rng: np.random.Generator) -> Expected:
    expected: Expected = {}
    images, labels = {}, {}
    for tile in POTSDAM_VAL:

        def name(y0, y1, x0, x1, tile=tile):
            return (f"{tile}_{x0}_{y0}_{x1}_{y1}.png",) * 2

        image, label = _isprs_scene(rng, expected, name)
        images[f"2_Ortho_RGB/top_potsdam_{tile}_RGB.tif"] = image
        labels[f"top_potsdam_{tile}_label_noBoundary.tif"] = label
    # 2_10 is a train tile: not converted
    images["2_Ortho_RGB/top_potsdam_2_10_RGB.tif"] = encoded(rgb(rng, 10, 12), "TIFF")
    labels["top_potsdam_2_10_label_noBoundary.tif"] = encoded(rgb(rng, 10, 12), "TIFF")
    write_zip(raw / "2_Ortho_RGB.zip", images)
    write_zip(raw / "5_Labels_all_noBoundary.zip", labels)
    return expected


def vaihingen(raw: Path, rng: np.random.Generator) -> Expected:
    expected: Expected = {}
    images = {}
    extracted = raw / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
    for area in VAIHINGEN_VAL:

        def name(y0, y1, x0, x1, area=area):
            return (f"area{area}_{x0}_{y0}_{x1}_{y1}.png",) * 2

        image, label = _isprs_scene(rng, expected, name)
        images[f"top/top_mosaic_09cm_area{area}.tif"] = image
        write(extracted / f"top_mosaic_09cm_area{area}_noBoundary.tif", label)
    # the same file name outside top/ (boundary ground truth in the image archive) must not be taken as image
    images["gts_for_participants/top_mosaic_09cm_area2.tif"] = encoded(np.zeros((10, 12, 3), np.uint8), "TIFF")
    images["top/top_mosaic_09cm_area1.tif"] = encoded(rgb(rng, 10, 12), "TIFF")  # a train area
    write_zip(raw / "ISPRS_semantic_labeling_Vaihingen.zip", images)
    return expected


def uavid(raw: Path, rng: np.random.Generator) -> Expected:
    expected: Expected = {}
    for seq, frame, (h, w) in [("seq21", "000000", (6, 13)), ("seq21", "000100", (3, 6)), ("seq22", "000000", (4, 6))]:
        image = rgb(rng, h, w)
        colour, index = colour_label(rng, h, w, UAVID_COLOURS)
        write(raw / "UAVid" / "test_gt" / seq / "Images" / f"{frame}.png", encoded(image, "PNG"))
        write(raw / "UAVid" / "test_gt" / seq / "Labels" / f"{frame}.png", encoded(colour, "PNG"))

        def name(y0, y1, x0, x1, prefix=f"{seq}_{frame}"):
            return (f"{prefix}_{y0}_{y1}_{x0}_{x1}.png",) * 2

        _tiles(expected, image, index, TINY_PATCHES["UAVID_PATCH"], TINY_PATCHES["UAVID_PATCH"], name, ("img_dir/test", "ann_dir/test"), pad_label=255)
    write(raw / "UAVid" / "train" / "seq1" / "Images" / "000000.png", encoded(rgb(rng, 4, 6), "PNG"))
    return expected


def _released(raw: Path, rng: np.random.Generator, root: str, split: str, classes: int) -> Expected:
    expected: Expected = {}
    for stem in ["DJI_0001", "DJI_0002"]:
        image = write(raw / root / split / "src" / f"{stem}.JPG", encoded(rgb(rng, 6, 8), "JPEG"))
        label = write(raw / root / split / "gt" / f"{stem}.png", encoded(rng.integers(0, classes, (6, 8), dtype=np.uint8), "PNG"))
        expected[f"{split}/src/{stem}.JPG"], expected[f"{split}/gt/{stem}.png"] = image, label
    return expected


def udd5(raw: Path, rng: np.random.Generator) -> Expected:
    return _released(raw, rng, "UDD5", "val", 5)


def vdd(raw: Path, rng: np.random.Generator) -> Expected:
    return _released(raw, rng, "VDD", "test", 7)


def _binary(raw: Path, rng: np.random.Generator, *, img_in: str, lab_in: str, img_end: str, lab_end: str,
            img_out: str, lab_out: str, img_fmt: str, lab_fmt: str, out_img_suffix: str, out_lab_suffix: str,
            ids: list[str], mask: Callable | None = None) -> Expected:  # fmt: skip
    """``mask(rng) -> (stored mask, expected 0/1)``; default: gray 0..255 thresholded at 128."""
    mask = mask or gray_mask
    expected: Expected = {}
    for image_id in ids:
        image = write(raw / img_in / f"{image_id}{img_end}", encoded(rgb(rng, 5, 7), img_fmt))
        stored, binary = mask(rng)
        write(raw / lab_in / f"{image_id}{lab_end}", encoded(stored, lab_fmt))
        expected[f"{img_out}/{image_id}{out_img_suffix}"] = image
        expected[f"{lab_out}/{image_id}{out_lab_suffix}"] = binary
    return expected


def whu_aerial(raw: Path, rng: np.random.Generator) -> Expected:
    return _binary(raw, rng, img_in="WHU/val/image", lab_in="WHU/val/label", img_end=".tif", lab_end=".tif",
                   img_out="val/image", lab_out="val/label_cvt", img_fmt="TIFF", lab_fmt="TIFF",
                   out_img_suffix=".tif", out_lab_suffix=".tif", ids=["2_960", "3_1"])  # fmt: skip


def whu_sat_ii(raw: Path, rng: np.random.Generator) -> Expected:
    return _binary(raw, rng, img_in="1.cropped/test/image", lab_in="1.cropped/test/label", img_end=".tif",
                   lab_end=".tif", img_out="test/image", lab_out="test/label_cvt", img_fmt="TIFF", lab_fmt="TIFF",
                   out_img_suffix=".tif", out_lab_suffix=".tif", ids=["0", "1"])  # fmt: skip


def inria(raw: Path, rng: np.random.Generator) -> Expected:
    expected: Expected = {}
    root = raw / "AerialImageDataset" / "train"
    for tile in INRIA_TEST + ["bellingham1"]:
        image, mask = rgb(rng, 6, 5), binary_mask(rng, 6, 5)
        write(root / "images" / f"{tile}.tif", encoded(image, "TIFF"))
        write(root / "gt" / f"{tile}.tif", encoded(mask, "TIFF"))
        if tile in INRIA_TEST:

            def name(y0, y1, x0, x1, tile=tile):
                return (f"{tile}_{x0}_{y0}_{x1}_{y1}.png",) * 2

            _tiles(expected, image, (mask >= 128).astype(np.uint8), TINY_PATCHES["INRIA_PATCH"], TINY_PATCHES["INRIA_PATCH"], name,
                   ("img_dir/split_test", "ann_dir/split_test"))  # fmt: skip
    return expected


def xbd_pre(raw: Path, rng: np.random.Generator) -> Expected:
    expected = _binary(raw, rng, img_in="xBD/test/images", lab_in="xBD/test/targets", img_end=".png",
                       lab_end="_target.png", img_out="test/images_pre", lab_out="test/targets_cvt_pre",
                       img_fmt="PNG", lab_fmt="PNG", out_img_suffix=".png", out_lab_suffix=".png",
                       ids=["palu-tsunami_00000001_pre_disaster", "socal-fire_00001_pre_disaster"],
                       mask=damage_levels)  # fmt: skip
    # post-disaster files are not evaluated
    write(raw / "xBD/test/images/socal-fire_00001_post_disaster.png", encoded(rgb(rng, 5, 7), "PNG"))
    write(raw / "xBD/test/targets/socal-fire_00001_post_disaster_target.png", encoded(np.ones((5, 7), np.uint8), "PNG"))
    return expected


def chn6_cug(raw: Path, rng: np.random.Generator) -> Expected:
    expected = _binary(raw, rng, img_in="CHN6-CUG/val/images", lab_in="CHN6-CUG/val/gt", img_end="_sat.jpg",
                       lab_end="_mask.png", img_out="val/image_cvt", lab_out="val/label_cvt", img_fmt="JPEG",
                       lab_fmt="PNG", out_img_suffix=".jpg", out_lab_suffix=".png", ids=["am100001", "bj100002"])  # fmt: skip
    write(raw / "CHN6-CUG/train/images/x_sat.jpg", encoded(rgb(rng, 5, 7), "JPEG"))
    return expected


def _road(raw, rng, folder, img_end, lab_end, img_out, lab_out, out_img_suffix):
    expected = _binary(raw, rng, img_in=f"GlobalRoadSet_Val/{folder}/img", lab_in=f"GlobalRoadSet_Val/{folder}/gt",
                       img_end=img_end, lab_end=lab_end, img_out=img_out, lab_out=lab_out, img_fmt="JPEG",
                       lab_fmt="PNG", out_img_suffix=out_img_suffix, out_lab_suffix=".png", ids=["10", "11"])  # fmt: skip
    return expected


def deepglobe(raw: Path, rng: np.random.Generator) -> Expected:
    expected = _road(raw, rng, "DeepGlobe_test_1530", "_sat.jpg", "_mask.png", "image_cvt", "label_cvt", ".jpg")
    _road(raw, rng, "Massachusetts_test_49", ".jpg", ".png", "img", "label_cvt", ".jpg")  # a sibling to ignore
    return expected


def massachusetts(raw: Path, rng: np.random.Generator) -> Expected:
    return _binary(raw, rng, img_in="Massachusetts_test_49/img", lab_in="Massachusetts_test_49/gt",
                   img_end=".jpg", lab_end=".png", img_out="img", lab_out="label_cvt", img_fmt="JPEG",
                   lab_fmt="PNG", out_img_suffix=".jpg", out_lab_suffix=".png", ids=["10228690_15"],
                   mask=colour_mask)  # fmt: skip


def spacenet(raw: Path, rng: np.random.Generator) -> Expected:
    return _binary(raw, rng, img_in="SpaceNet_test_567/img", lab_in="SpaceNet_test_567/gt", img_end=".jpg",
                   lab_end=".png", img_out="img", lab_out="label_cvt", img_fmt="JPEG", lab_fmt="PNG",
                   out_img_suffix=".jpg", out_lab_suffix=".png", ids=["AOI_2_Vegas_1", "AOI_3_Paris_2"])  # fmt: skip


def wbs_si(raw: Path, rng: np.random.Generator) -> Expected:
    root = raw / "WaterBodiesDatasetPreprocessed"
    expected: Expected = {}
    for number in (1, 2, 3):
        image = write(root / "Images" / f"water_body_{number}.jpg", encoded(rgb(rng, 16, 16), "JPEG"))
        # 8x8-aligned constant blocks survive JPEG exactly, so the expected 0/1 values are exact
        blocks = rng.integers(0, 2, (2, 2), dtype=np.uint8) * 255
        mask = np.kron(blocks, np.ones((8, 8), np.uint8))
        write(root / "Masks" / f"water_body_{number}.jpg", encoded(mask, "JPEG"))
        if number != 2:
            expected[f"Images/water_body_{number}.jpg"] = image
            expected[f"Masks_cvt/water_body_{number}.jpg"] = (mask >= 128).astype(np.uint8)
    split = write(root / "wbs-si_val.txt", b"water_body_3\nwater_body_1\n")
    expected["wbs-si_val.txt"] = split
    return expected


BUILDERS: dict[str, Callable[[Path, np.random.Generator], Expected]] = {
    "OpenEarthMap": openearthmap,
    "LoveDA": loveda,
    "iSAID": isaid,
    "Potsdam": potsdam,
    "Vaihingen": vaihingen,
    "UAVid": uavid,
    "UDD5": udd5,
    "VDD": vdd,
    "WHU_Aerial": whu_aerial,
    "WHU_Sat_II": whu_sat_ii,
    "Inria": inria,
    "xBD_pre": xbd_pre,
    "CHN6-CUG": chn6_cug,
    "DeepGlobe": deepglobe,
    "Massachusetts": massachusetts,
    "SpaceNet": spacenet,
    "WBS-SI": wbs_si,
}
