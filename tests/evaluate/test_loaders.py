"""Loaders list converted samples in mmseg's order and decode images and labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coninfer.errors import InputError, InputFileError
from coninfer.evaluate.loaders import (
    iter_pairs,
    list_samples,
    load_sample,
    read_image,
    read_label,
    resolve_data_root,
)
from coninfer.evaluate.specs import load_dataset_spec


def _save(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_samples_are_sorted_by_file_name(tmp_path):
    spec = load_dataset_spec("iSAID")
    for name in ["P0010_0_896_0_896", "P0002_512_1408_0_896", "P0002_0_896_0_896"]:
        _save(tmp_path / "img_dir/val" / f"{name}.png", np.zeros((2, 2, 3), np.uint8))
        _save(tmp_path / "ann_dir/val" / f"{name}_instance_color_RGB.png", np.zeros((2, 2), np.uint8))
    samples = list_samples(spec, tmp_path)
    assert [s.name for s in samples] == ["P0002_0_896_0_896.png", "P0002_512_1408_0_896.png", "P0010_0_896_0_896.png"]
    assert samples[0].label_path.name == "P0002_0_896_0_896_instance_color_RGB.png"
    assert [p for p, _ in iter_pairs(spec, tmp_path)] == [s.image_path for s in samples]


def test_split_file_sets_the_order(tmp_path):
    spec = load_dataset_spec("wbs-si")
    for stem in ["water_body_1", "water_body_2", "water_body_3"]:
        _save(tmp_path / "Images" / f"{stem}.jpg", np.zeros((2, 2, 3), np.uint8), "JPEG")
        _save(tmp_path / "Masks_cvt" / f"{stem}.jpg", np.zeros((2, 2), np.uint8), "JPEG")
    (tmp_path / "wbs-si_val.txt").write_text("water_body_3\nwater_body_1\n")
    assert [s.name for s in list_samples(spec, tmp_path)] == ["water_body_3.jpg", "water_body_1.jpg"]


def test_segearth_style_data_folder_is_accepted(tmp_path):
    spec = load_dataset_spec("DeepGlobe")
    root = tmp_path / "data" / "GlobalRoadSet_Val" / "DeepGlobe_test_1530"
    _save(root / "image_cvt/1.jpg", np.zeros((2, 2, 3), np.uint8), "JPEG")
    _save(root / "label_cvt/1.png", np.zeros((2, 2), np.uint8))
    assert resolve_data_root(spec, tmp_path / "data") == root
    assert len(list_samples(spec, tmp_path / "data")) == 1


def test_unconverted_folder_points_to_convert(tmp_path):
    with pytest.raises(InputFileError) as info:
        list_samples(load_dataset_spec("Potsdam"), tmp_path)
    assert "coninfer data convert Potsdam" in info.value.hint


def test_missing_label_is_reported(tmp_path):
    spec = load_dataset_spec("UDD5")
    _save(tmp_path / "val/src/a.JPG", np.zeros((2, 2, 3), np.uint8), "JPEG")
    (tmp_path / "val/gt").mkdir(parents=True)
    with pytest.raises(InputFileError, match="a.png"):
        list_samples(spec, tmp_path)


def test_read_image_tiff_and_gray(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    _save(tmp_path / "a.tif", rgb, "TIFF")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), rgb)
    _save(tmp_path / "g.png", rgb[..., 0])
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 2], rgb[..., 0])


def test_read_label_palette_and_tiff(tmp_path):
    encoding = load_dataset_spec("OpenEarthMap").label_encoding
    values = np.array([[0, 1, 8], [255, 3, 2]], np.uint8)
    palette_image = Image.fromarray(values, mode="P")
    palette_image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label(tmp_path / "p.png", encoding), values)
    _save(tmp_path / "l.tif", values, "TIFF")
    np.testing.assert_array_equal(read_label(tmp_path / "l.tif", encoding), values)


def test_read_label_applies_reduce_zero_label(tmp_path):
    _save(tmp_path / "l.png", np.array([[0, 1, 7, 255]], np.uint8))
    label = read_label(tmp_path / "l.png", load_dataset_spec("Vaihingen").label_encoding)
    np.testing.assert_array_equal(label, [[255, 0, 6, 255]])


def test_colour_label_is_refused(tmp_path):
    _save(tmp_path / "c.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="single-band"):
        read_label(tmp_path / "c.png", load_dataset_spec("UAVid").label_encoding)


def test_label_of_another_size_than_its_image_names_both_files(tmp_path):
    spec = load_dataset_spec("DeepGlobe")
    _save(tmp_path / "image_cvt/1.jpg", np.zeros((4, 6, 3), np.uint8), "JPEG")
    _save(tmp_path / "label_cvt/1.png", np.zeros((4, 5), np.uint8))  # one column short
    (sample,) = list_samples(spec, tmp_path)
    with pytest.raises(InputError) as info:
        load_sample(spec, sample)
    message = str(info.value.args[0])
    assert str(sample.label_path) in message and str(sample.image_path) in message
    assert "5x4" in message and "6x4" in message and "\n" not in str(info.value)
    assert "coninfer data convert DeepGlobe" in info.value.hint


def test_label_of_its_image_size_loads(tmp_path):
    spec = load_dataset_spec("DeepGlobe")
    _save(tmp_path / "image_cvt/1.jpg", np.zeros((4, 6, 3), np.uint8), "JPEG")
    _save(tmp_path / "label_cvt/1.png", np.zeros((4, 6), np.uint8))
    image, label = load_sample(spec, list_samples(spec, tmp_path)[0])
    assert image.shape == (4, 6, 3) and label.shape == (4, 6)


def test_tiff_reads_in_threads_leave_the_warning_filters_alone(tmp_path):
    """The evaluation reads in threads; catch_warnings is process-wide, so unguarded it races: a thread restores
    another's filters, and the silenced NotGeoreferencedWarning either leaks (an error here) or stays silenced."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import rasterio

    path = tmp_path / "plain.tif"
    _save(path, np.zeros((3, 4, 3), np.uint8), "TIFF")  # no georeference: rasterio warns at every open
    with warnings.catch_warnings():
        warnings.simplefilter("error", rasterio.errors.NotGeoreferencedWarning)
        before = list(warnings.filters)
        with ThreadPoolExecutor(8) as pool:
            shapes = list(pool.map(lambda _: read_image(path).shape, range(400)))
        assert warnings.filters == before
    assert set(shapes) == {(3, 4, 3)}
