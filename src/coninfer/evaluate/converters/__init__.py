"""Turn each benchmark's download into the folder layout and label values of the SegEarth-OV/ConInfer preparation.

``convert_dataset("Potsdam", raw_dir, out_dir)`` checks the raw layout (raising :class:`InputFileError` that names
what is missing), then writes ``out_dir/<layout.img_dir>`` and ``out_dir/<layout.ann_dir>`` as the reference
converters did, without mmcv or OpenCV. Reruns skip finished inputs; see :mod:`._tasks`.

Departures from the reference scripts, none of which changes a pixel value:
  * patches are written as real PNG (the iSAID/UAVid scripts wrote BMP data under a .png name);
  * scenes smaller than a patch are padded in every case (the iSAID script skipped padding when one side was
    exactly the patch size, which produced cropped patches with negative offsets in the name);
  * only the evaluated split is converted (val/test; xBD: the pre-disaster images; WBS-SI: the 499 listed stems).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coninfer.evaluate.converters import simple, tiled
from coninfer.evaluate.converters._tasks import ConversionSummary, Task, run_tasks
from coninfer.evaluate.specs import DatasetSpec, load_dataset_spec

Converter = Callable[[DatasetSpec, Path, Path], list[Task]]

CONVERTERS: dict[str, Converter] = {
    "OpenEarthMap": simple.openearthmap,
    "LoveDA": simple.loveda,
    "iSAID": tiled.isaid,
    "Potsdam": tiled.potsdam,
    "Vaihingen": tiled.vaihingen,
    "UAVid": tiled.uavid,
    "UDD5": simple.as_released,
    "VDD": simple.as_released,
    "WHU_Aerial": simple.binary,
    "WHU_Sat_II": simple.binary,
    "Inria": tiled.inria,
    "xBD_pre": simple.binary,
    "CHN6-CUG": simple.binary,
    "DeepGlobe": simple.binary,
    "Massachusetts": simple.binary,
    "SpaceNet": simple.binary,
    "WBS-SI": simple.binary,
}


def converter_kind(name: str) -> str:
    """Short description of a dataset's converter for listings ("tile 512x512 + colour map", "copy as released")."""
    spec = load_dataset_spec(name)
    function = CONVERTERS[spec.name]
    kinds = {
        simple.openearthmap: "copy val.txt files",
        simple.loveda: "copy Val Urban+Rural",
        simple.as_released: "copy as released",
        simple.binary: "binarise labels",
        tiled.isaid: "tile + colour map",
        tiled.potsdam: "tile + colour map",
        tiled.vaihingen: "tile + colour map",
        tiled.uavid: "tile + colour map",
        tiled.inria: "tile + binarise labels",
    }
    return kinds[function]


def convert_dataset(name: str, raw_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> ConversionSummary:
    """Convert dataset ``name`` (case-insensitive) from ``raw_dir`` into ``out_dir`` (the evaluation data root).

    Validates the whole raw layout before writing anything. Idempotent: finished inputs are skipped, and files
    whose bytes are already correct are not rewritten. ``progress`` shows a tqdm bar when stderr is a terminal.
    """
    spec = load_dataset_spec(name)
    out_dir = Path(out_dir)
    tasks = CONVERTERS[spec.name](spec, Path(raw_dir), out_dir)
    return run_tasks(spec.name, out_dir, tasks, progress=progress)


__all__ = ["CONVERTERS", "ConversionSummary", "convert_dataset", "converter_kind"]
