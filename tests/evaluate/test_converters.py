"""Each converter turns a tiny synthetic download (original layout) into the expected files and label values."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_raw import BUILDERS, TINY_PATCHES

from coninfer.errors import InputError, InputFileError
from coninfer.evaluate import convert_dataset, dataset_names
from coninfer.evaluate.converters import tiled
from coninfer.evaluate.converters._io import window_starts


@pytest.fixture(autouse=True)
def tiny_patches(monkeypatch):
    for name, value in TINY_PATCHES.items():
        monkeypatch.setattr(tiled, name, value)


def _outputs(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _check(out_dir: Path, expected: dict) -> None:
    assert _outputs(out_dir) == set(expected)
    for rel, want in expected.items():
        path = out_dir / rel
        if isinstance(want, bytes):
            assert path.read_bytes() == want, rel
        else:
            with Image.open(path) as image:
                got = np.asarray(image)
            np.testing.assert_array_equal(got, want, err_msg=rel)


def test_builders_cover_every_dataset():
    assert set(BUILDERS) == set(dataset_names())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_convert_produces_expected_files_and_is_idempotent(name, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = BUILDERS[name](raw, np.random.default_rng(0))
    first = convert_dataset(name.lower(), raw, out, progress=False)
    _check(out, expected)
    assert first.files_written == len(expected) and first.tasks_skipped == 0

    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in expected}
    second = convert_dataset(name, raw, out, progress=False)
    assert second.files_written == 0 and second.tasks_skipped == second.tasks
    assert {rel: (out / rel).stat().st_mtime_ns for rel in expected} == mtimes


@pytest.mark.parametrize("name", ["iSAID", "WBS-SI", "LoveDA"])
def test_rerun_without_manifest_rewrites_nothing(name, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = BUILDERS[name](raw, np.random.default_rng(1))
    convert_dataset(name, raw, out, progress=False)
    for manifest in out.glob(".coninfer-convert-*.json"):
        manifest.unlink()
    summary = convert_dataset(name, raw, out, progress=False)
    assert summary.files_written == 0 and summary.files_unchanged == len(expected)
    _check(out, expected)


def test_changed_output_is_rewritten(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = BUILDERS["DeepGlobe"](raw, np.random.default_rng(2))
    convert_dataset("DeepGlobe", raw, out, progress=False)
    (out / "label_cvt" / "10.png").write_bytes(b"broken")
    summary = convert_dataset("DeepGlobe", raw, out, progress=False)
    assert summary.files_written == 1
    _check(out, expected)


def test_in_place_conversion_keeps_images(tmp_path):
    raw = tmp_path / "SpaceNet_test_567"
    expected = BUILDERS["SpaceNet"](tmp_path, np.random.default_rng(3))
    summary = convert_dataset("spacenet", raw, raw, progress=False)
    assert summary.files_written == 2  # only the label_cvt files
    for rel, want in expected.items():
        if isinstance(want, bytes):  # the images, used where they are
            assert (raw / rel).read_bytes() == want, rel
        else:
            np.testing.assert_array_equal(np.asarray(Image.open(raw / rel)), want, err_msg=rel)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_empty_raw_folder_names_what_is_missing(name, tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises((InputFileError, InputError)) as info:
        convert_dataset(name, tmp_path / "raw", tmp_path / "out", progress=False)
    assert name in str(info.value)
    assert info.value.hint
    assert not (tmp_path / "out").exists()


def test_missing_raw_folder(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        convert_dataset("Potsdam", tmp_path / "nowhere", tmp_path / "out")


def test_missing_label_of_one_tile_is_named(tmp_path):
    raw = tmp_path / "raw"
    BUILDERS["Inria"](raw, np.random.default_rng(4))
    (raw / "AerialImageDataset" / "train" / "gt" / "kitsap9.tif").unlink()
    with pytest.raises(InputFileError, match="label of tile kitsap9"):
        convert_dataset("Inria", raw, tmp_path / "out", progress=False)


def test_wbs_si_needs_its_split_file(tmp_path):
    raw = tmp_path / "raw"
    BUILDERS["WBS-SI"](raw, np.random.default_rng(5))
    (raw / "WaterBodiesDatasetPreprocessed" / "wbs-si_val.txt").unlink()
    with pytest.raises(InputFileError, match="wbs-si_val.txt") as info:
        convert_dataset("WBS-SI", raw, tmp_path / "out", progress=False)
    assert "SegEarth-OV" in info.value.hint


def test_missing_label_of_copied_dataset_is_named(tmp_path):
    raw = tmp_path / "raw"
    BUILDERS["UDD5"](raw, np.random.default_rng(6))
    (raw / "UDD5" / "val" / "gt" / "DJI_0002.png").unlink()
    with pytest.raises(InputFileError, match="DJI_0002.png"):
        convert_dataset("UDD5", raw, tmp_path / "out", progress=False)


def test_colour_labels_of_released_dataset_are_refused(tmp_path):
    raw = tmp_path / "raw"
    BUILDERS["VDD"](raw, np.random.default_rng(7))
    for label in (raw / "VDD" / "test" / "gt").iterdir():
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(label)
    with pytest.raises(InputError, match="not an index map"):
        convert_dataset("VDD", raw, tmp_path / "out", progress=False)


def test_dataset_folder_is_found_by_name_among_siblings(tmp_path):
    raw = tmp_path / "GlobalRoadSet_Val"
    BUILDERS["SpaceNet"](raw, np.random.default_rng(8))
    expected = BUILDERS["Massachusetts"](raw, np.random.default_rng(9))
    convert_dataset("Massachusetts", raw, tmp_path / "out", progress=False)
    _check(tmp_path / "out", expected)


def test_ambiguous_raw_folder_asks_for_the_right_one(tmp_path):
    raw = tmp_path / "roads"
    BUILDERS["SpaceNet"](raw, np.random.default_rng(8))
    (raw / "SpaceNet_test_567").rename(raw / "copy_a")
    BUILDERS["SpaceNet"](raw, np.random.default_rng(9))
    (raw / "SpaceNet_test_567").rename(raw / "copy_b")
    with pytest.raises(InputError, match="several folders") as info:
        convert_dataset("SpaceNet", raw, tmp_path / "out", progress=False)
    assert "RAW_DIR" in info.value.hint


@pytest.mark.parametrize(
    ("length", "size", "step", "starts"),
    [
        (6000, 512, 512, list(range(0, 5121, 512)) + [5488]),  # Potsdam: 12 x 12 = 144 patches per tile
        (5000, 1000, 1000, [0, 1000, 2000, 3000, 4000]),  # Inria: 25 patches per tile
        (2160, 1080, 1080, [0, 1080]),  # UAVid rows
        (4096, 1280, 1280, [0, 1280, 2560, 2816]),  # UAVid columns of a 4096-wide frame
        (1100, 896, 512, [0, 204]),  # iSAID: two shifted windows collapse into one
        (300, 512, 512, [0]),
    ],
)
def test_window_starts(length, size, step, starts):
    assert window_starts(length, size, step) == starts


def test_potsdam_real_sizes_give_2016_patches():
    assert len(window_starts(6000, 512, 512)) ** 2 * 14 == 2016


def test_isaid_archive_and_its_extracted_copy_are_not_doubled(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = BUILDERS["iSAID"](raw, np.random.default_rng(10))
    with zipfile.ZipFile(raw / "val" / "images" / "part1.zip") as archive:
        archive.extractall(raw / "val" / "images")
    convert_dataset("iSAID", raw, out, progress=False)
    _check(out, expected)
