"""Tests of coninfer.raster.write: COG class map and probabilities, vectors, preview, report, atomicity."""

from __future__ import annotations

import ctypes
import glob
import json
import math
import os
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import rasters
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.windows import Window

from coninfer.errors import OutputError
from coninfer.raster import (
    NODATA_LABEL,
    BandStitcher,
    ClassMapWriter,
    Georef,
    ProbabilityWriter,
    TileGrid,
    block_windows,
    check_output_path,
    class_areas,
    class_statistics,
    count_classes,
    default_colors,
    open_scene,
    read_overview,
    read_window,
    write_class_map,
    write_preview,
    write_probabilities,
    write_report,
    write_vectors,
)
from coninfer.raster import write as write_module
from coninfer.raster.style import class_colors
from coninfer.raster.write import ConfidenceWriter

NAMES = ["background", "building", "road", "tree"]
# 1200 x 700: larger than one 512 COG block, so the COG gets an overview; not a multiple of the block size
GEOREF = Georef(1200, 700, CRS.from_epsg(25832), Affine(0.5, 0.0, 346000.0, 0.0, -0.5, 5648000.0))


def _labels(georef: Georef = GEOREF) -> np.ndarray:
    """Blocky labels (class = 50 px cell index mod 4) with an invalid 30-row band at the top."""
    rows, cols = np.mgrid[0 : georef.height, 0 : georef.width]
    labels = ((rows // 50 + cols // 50) % len(NAMES)).astype(np.uint8)
    labels[:30] = NODATA_LABEL
    return labels


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _gdal_category_names(path: Path) -> list[str]:
    """Band 1's category names as GDAL itself reads them (rasterio has no API for them): the C API of the
    libgdal bundled with rasterio, through ctypes."""
    libraries = glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*"))
    if not libraries:
        pytest.skip("no bundled libgdal next to rasterio to call GDALGetRasterCategoryNames")
    gdal = ctypes.CDLL(libraries[0])
    gdal.GDALOpen.restype = gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALOpen.argtypes, gdal.GDALGetRasterBand.argtypes = [ctypes.c_char_p, ctypes.c_int], [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetMetadata.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = gdal.GDALClose.argtypes = [ctypes.c_void_p]
    gdal.GDALAllRegister()
    dataset = gdal.GDALOpen(str(path).encode(), 0)
    try:
        gdal.GDALGetMetadata(dataset, None)  # GTiff loads the .aux.xml lazily, on its first metadata request
        names = gdal.GDALGetRasterCategoryNames(gdal.GDALGetRasterBand(dataset, 1))
        found = []
        while names and names[len(found)]:
            found.append(names[len(found)].decode())
        return found
    finally:
        gdal.GDALClose(dataset)


class TestClassMap:
    def test_cog_georef_colours_names(self, tmp_path: Path) -> None:
        labels = _labels()
        path = write_class_map(tmp_path / "classes.tif", labels, GEOREF, NAMES)
        with rasterio.open(path) as src:
            assert (src.width, src.height, src.count, src.dtypes[0]) == (1200, 700, 1, "uint8")
            assert src.crs == GEOREF.crs and src.transform == GEOREF.transform and src.nodata == 255
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert src.profile["tiled"] and src.overviews(1) == [2, 4]
            overview = src.read(1, out_shape=(175, 300))  # served from the 4x overview
            assert set(np.unique(overview)) <= {0, 1, 2, 3, 255}  # nearest: no blended class values
            assert json.loads(src.tags()["CLASS_NAMES"]) == NAMES
            assert src.tags(1)["CLASS_1"] == "building"
            colormap = src.colormap(1)
            assert [colormap[i][:3] for i in range(4)] == class_colors(NAMES)
            assert colormap[255][3] == 0
            np.testing.assert_array_equal(src.read(1), labels)
        assert _leftovers(tmp_path) == ["classes.qml", "classes.tif", "classes.tif.aux.xml"]
        assert _gdal_category_names(path) == NAMES
        qml = (tmp_path / "classes.qml").read_text()
        assert qml.count("<paletteEntry") == 4 and 'label="building"' in qml

    def test_without_sidecars(self, tmp_path: Path) -> None:
        write_class_map(tmp_path / "classes.tif", _labels(), GEOREF, NAMES, sidecars=False)
        assert _leftovers(tmp_path) == ["classes.tif"]
        assert _gdal_category_names(tmp_path / "classes.tif") == []

    def test_block_wise_equals_whole(self, tmp_path: Path) -> None:
        labels = _labels()
        blocks = ((w, labels[w.toslices()]) for w in block_windows(GEOREF.width, GEOREF.height, 300))
        write_class_map(tmp_path / "blocks.tif", blocks, GEOREF, NAMES, colors=[(1, 2, 3)] * 4)
        with rasterio.open(tmp_path / "blocks.tif") as src:
            np.testing.assert_array_equal(src.read(1), labels)
            assert src.colormap(1)[3] == (1, 2, 3, 255)

    def test_not_georeferenced(self, tmp_path: Path) -> None:
        georef = Georef(40, 30, None, Affine.identity())
        write_class_map(tmp_path / "plain.tif", np.zeros((30, 40), np.uint8), georef, NAMES)
        with rasterio.open(tmp_path / "plain.tif") as src:
            assert src.crs is None and src.read(1).shape == (30, 40)

    def test_failure_mid_write_leaves_nothing(self, tmp_path: Path) -> None:
        def blocks():
            yield Window(0, 0, 512, 512), np.zeros((512, 512), np.uint8)
            raise RuntimeError("model crashed")

        with pytest.raises(RuntimeError, match="model crashed"):
            write_class_map(tmp_path / "classes.tif", blocks(), GEOREF, NAMES)
        assert _leftovers(tmp_path) == []

    def test_failure_in_cog_copy_keeps_old_output(self, tmp_path: Path, monkeypatch) -> None:
        (tmp_path / "classes.tif").write_bytes(b"previous result")

        def broken_copy(*args, **kwargs):
            raise rasterio.errors.RasterioIOError("disk full")

        monkeypatch.setattr(rasterio.shutil, "copy", broken_copy)
        with pytest.raises(rasterio.errors.RasterioIOError, match="disk full"):
            write_class_map(tmp_path / "classes.tif", _labels(), GEOREF, NAMES)
        assert _leftovers(tmp_path) == ["classes.tif"]
        assert (tmp_path / "classes.tif").read_bytes() == b"previous result"

    def test_staging_falls_back_to_deflate_without_zstd(self, tmp_path: Path, monkeypatch) -> None:
        codecs, real_open = [], rasterio.open

        def open_without_zstd(path, mode="r", **kwargs):
            if mode == "w":
                codecs.append(kwargs.get("compress"))
                if kwargs.get("compress") == "zstd":  # as a GDAL built without the codec answers
                    raise rasterio.errors.RasterioIOError("Cannot create TIFF file due to missing codec for zstd.")
            return real_open(path, mode, **kwargs)

        monkeypatch.setattr(rasterio, "open", open_without_zstd)
        write_class_map(tmp_path / "classes.tif", _labels(), GEOREF, NAMES, sidecars=False)
        assert codecs == ["zstd", "deflate"]
        assert _leftovers(tmp_path) == ["classes.tif"]
        with real_open(tmp_path / "classes.tif") as src:
            np.testing.assert_array_equal(src.read(1), _labels())

    def test_rejects_bad_blocks(self, tmp_path: Path) -> None:
        with ClassMapWriter(tmp_path / "c.tif", GEOREF, NAMES) as writer:
            with pytest.raises(ValueError, match="does not match window"):
                writer.write(Window(0, 0, 10, 10), np.zeros((5, 10), np.uint8))
            with pytest.raises(ValueError, match="labels must be uint8 in 0..3 or 255"):
                writer.write(Window(0, 0, 2, 1), np.array([[0, 7]], np.uint8))


class TestProbabilities:
    def test_bands_descriptions_mask(self, tmp_path: Path) -> None:
        georef = Georef(75, 53, GEOREF.crs, GEOREF.transform)
        probs = np.random.default_rng(0).random((4, 53, 75)).astype(np.float32)
        valid = np.ones((53, 75), bool)
        valid[:, :10] = False
        blocks = [
            (w, probs[(slice(None), *w.toslices())], valid[w.toslices()]) for w in block_windows(75, 53, 32)
        ]
        write_probabilities(tmp_path / "probs.tif", blocks, georef, NAMES)
        with rasterio.open(tmp_path / "probs.tif") as src:
            assert src.count == 4 and src.descriptions == tuple(NAMES) and src.dtypes[0] == "uint8"
            assert src.crs == georef.crs and src.transform == georef.transform
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            data, mask = src.read(), src.dataset_mask()
        np.testing.assert_array_equal(mask > 0, valid)
        expected = np.rint(probs * 255).astype(np.uint8)
        np.testing.assert_array_equal(data[:, valid], expected[:, valid])
        assert _leftovers(tmp_path) == ["probs.tif"]

    def test_whole_array(self, tmp_path: Path) -> None:
        georef = Georef(20, 10, GEOREF.crs, GEOREF.transform)
        write_probabilities(tmp_path / "p.tif", np.full((2, 10, 20), 0.5, np.float32), georef, NAMES[:2])
        with rasterio.open(tmp_path / "p.tif") as src:
            assert (src.read() == 128).all() and src.descriptions == tuple(NAMES[:2])


class TestConfidence:
    def test_top_probability_and_mask(self, tmp_path: Path) -> None:
        georef = Georef(75, 53, GEOREF.crs, GEOREF.transform)
        probs = np.random.default_rng(1).dirichlet(np.ones(4), (53, 75)).transpose(2, 0, 1).astype(np.float32)
        valid = np.ones((53, 75), bool)
        valid[40:, :] = False
        with ConfidenceWriter(tmp_path / "conf.tif", georef) as writer:
            for window in block_windows(75, 53, 32):
                writer.write(window, probs[(slice(None), *window.toslices())], valid[window.toslices()])
        with rasterio.open(tmp_path / "conf.tif") as src:
            assert (src.count, src.dtypes[0], src.descriptions, src.nodata) == (1, "uint8", ("confidence",), None)
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.crs == georef.crs
            data, mask = src.read(1), src.dataset_mask()
        np.testing.assert_array_equal(mask > 0, valid)
        np.testing.assert_array_equal(data[valid], np.rint(probs.max(axis=0) * 255).astype(np.uint8)[valid])
        assert (data[~valid] == 0).all() and data[valid].min() >= 255 // 4
        assert _leftovers(tmp_path) == ["conf.tif"]

    def test_accepts_precomputed_maximum(self, tmp_path: Path) -> None:
        georef = Georef(20, 10, GEOREF.crs, GEOREF.transform)
        with ConfidenceWriter(tmp_path / "conf.tif", georef) as writer:
            writer.write(Window(0, 0, 20, 10), np.full((10, 20), 0.5, np.float32))
            with pytest.raises(ValueError, match="does not match window"):
                writer.write(Window(0, 0, 20, 10), np.zeros((2, 5, 20), np.float32))
        with rasterio.open(tmp_path / "conf.tif") as src:
            assert (src.read(1) == 128).all() and (src.dataset_mask() == 255).all()


class TestVectors:
    @pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
    def test_polygons_per_class(self, tmp_path: Path, suffix: str) -> None:
        labels = _labels()
        map_path = write_class_map(tmp_path / "classes.tif", labels, GEOREF, NAMES)
        path = write_vectors(tmp_path / f"classes{suffix}", map_path, NAMES)
        with fiona.open(path) as src:
            assert CRS.from_user_input(src.crs).to_epsg() == 25832
            features = list(src)
        assert [f.properties["class_name"] for f in features] == NAMES
        assert [f.properties["color"] for f in features] == ["#303030", "#d7191c", "#8c8c8c", "#1a6e28"]
        assert all(f.geometry.type == "MultiPolygon" for f in features)
        counts = count_classes(labels, len(NAMES))
        for feature in features:
            class_id = feature.properties["class_id"]
            assert feature.properties["area"] == pytest.approx(counts[class_id] * 0.25)
            assert feature.properties["area_unit"] == "m2"
        stats = class_statistics(counts, NAMES, GEOREF)
        assert sum(f.properties["area"] for f in features) == pytest.approx(sum(s["area"] for s in stats))
        assert _leftovers(tmp_path) == sorted(["classes.qml", "classes.tif", "classes.tif.aux.xml", f"classes{suffix}"])

    def test_array_input_holes_and_absent_class(self, tmp_path: Path) -> None:
        labels = np.zeros((20, 30), np.uint8)
        labels[5:10, 5:10] = 2  # a hole in class 0's polygon
        georef = Georef(30, 20, None, Affine.identity())
        write_vectors(tmp_path / "v.geojson", labels, NAMES, georef)
        with fiona.open(tmp_path / "v.geojson") as src:
            areas = {f.properties["class_name"]: f.properties["area"] for f in src}
            units = {f.properties["area_unit"] for f in src}
        assert areas == {"background": 575.0, "road": 25.0} and units == {"pixel"}

    def test_geographic_crs_areas_in_square_metres(self, tmp_path: Path) -> None:
        """Lon/lat (EPSG:4326): polygon and report areas on the ellipsoid in m², equal to each other."""
        georef = Georef(120, 70, CRS.from_epsg(4326), Affine(1e-4, 0.0, 6.9, 0.0, -1e-4, 50.95))
        labels = _labels(georef)
        write_vectors(tmp_path / "v.gpkg", write_class_map(tmp_path / "c.tif", labels, georef, NAMES), NAMES)
        with fiona.open(tmp_path / "v.gpkg") as src:
            areas = {f.properties["class_id"]: f.properties["area"] for f in src}
            assert {f.properties["area_unit"] for f in src} == {"m2"}
        blocks = [(window, labels[window.toslices()]) for window in block_windows(120, 70, block_size=32)]
        by_class = sum(class_areas(block, window, georef, len(NAMES)) for window, block in blocks)
        stats = class_statistics(count_classes(labels, len(NAMES)), NAMES, georef, by_class)
        assert [row["area_unit"] for row in stats] == ["m2"] * 4
        assert [areas[i] for i in range(4)] == pytest.approx([row["area"] for row in stats], rel=1e-9)
        # a 1e-4 degree pixel near 51 N is about 7.0 m x 11.1 m
        pixel = stats[0]["area"] / stats[0]["pixels"]
        assert pixel == pytest.approx(7.01 * 11.13, rel=5e-3)

    def test_unknown_extension(self, tmp_path: Path) -> None:
        with pytest.raises(OutputError, match="unknown extension '.shp'") as info:
            write_vectors(tmp_path / "v.shp", np.zeros((2, 2), np.uint8), NAMES, GEOREF)
        assert ".gpkg" in info.value.hint


class TestColors:
    def test_no_class_is_black_white_or_repeated(self) -> None:
        """Black is nodata's colour where the colour table's alpha is ignored; white vanishes on the legend."""
        colors = np.asarray(default_colors(NODATA_LABEL), int)
        assert len({tuple(c) for c in colors}) == NODATA_LABEL
        assert (colors.max(axis=1) >= 40).all() and (colors.min(axis=1) <= 215).all()
        assert default_colors(3) == default_colors(30)[:3]


class TestPreview:
    def test_size_and_overlay(self, tmp_path: Path) -> None:
        rgb = np.full((3, 350, 600), 100, np.uint8)
        labels = _labels()  # the scene at full size: sampled onto the preview
        path = write_preview(tmp_path / "preview.png", rgb, labels, NAMES, max_size=300)
        image = np.asarray(Image.open(path).convert("RGB"))
        assert Image.open(path).format == "PNG"
        assert image.shape[0] == 175 and image.shape[1] > 300  # 300 x 175 image + legend panel
        assert (image[0, 0] == 100).all()  # top rows invalid: image only
        label = labels[174 * 700 // 175, 25 * 1200 // 300]  # nearest sample of preview pixel (174, 25)
        expected = np.rint(0.5 * 100 + 0.5 * np.array(class_colors(NAMES)[label], float))
        np.testing.assert_array_equal(image[174, 25], expected)
        assert _leftovers(tmp_path) == ["preview.png"]


class TestReport:
    def test_counts_of_strided_blocks_and_other_dtypes(self) -> None:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 5, (60, 90)).astype(np.uint8)
        labels[::7, ::3] = 255
        block = labels[5:50:2, ::-3]  # non-contiguous, negative strides
        expected = np.array([(block == c).sum() for c in range(4)])  # class 4 is past num_classes
        for given in (block, block.astype(np.int32)):
            counts = count_classes(given, 4)
            assert counts.dtype == np.int64 and counts.tolist() == expected.tolist()

    def test_areas_of_equal_pixels_are_counts_times_the_pixel_area(self) -> None:
        """One product per class, not a sum of equal terms: exact where the weighted sum rounds."""
        labels = np.zeros((1000, 1000), np.uint8)
        labels[:, 600:] = 1
        georef = Georef(1000, 1000, CRS.from_epsg(25832), Affine(0.3, 0.0, 346000.0, 0.0, -0.3, 5648000.0))
        window = Window(0, 0, 1000, 1000)
        areas = class_areas(labels, window, georef, 3)
        pixel = georef.pixel_area
        assert areas.tolist() == [600_000 * pixel, 400_000 * pixel, 0.0]
        assert class_areas(labels, window, georef, 3, counts=np.array([1, 2, 3])).tolist() == \
            [pixel, 2 * pixel, 3 * pixel]
        assert areas[0] == math.fsum([pixel] * 600_000)  # the exactly rounded sum
        weighted = np.bincount(labels.ravel(), weights=np.full(labels.size, pixel), minlength=3)
        np.testing.assert_allclose(areas, weighted, rtol=1e-9)  # the sum of equal terms drifts (1.4e-11 here)

    def test_report_and_statistics(self, tmp_path: Path) -> None:
        counts = count_classes(np.array([[0, 1, 1, 255]], np.uint8), 3)
        assert counts.tolist() == [1, 2, 0]
        feet = Georef(4, 1, CRS.from_epsg(2263), Affine(1.0, 0, 0, 0, -1.0, 0))
        stats = class_statistics(counts, ["a", "b", "c"], feet)
        assert stats[1]["pixels"] == 2 and stats[1]["fraction"] == pytest.approx(2 / 3)
        assert stats[1]["area"] == pytest.approx(2 * 0.3048006096**2) and stats[1]["area_unit"] == "m2"
        write_report(tmp_path / "report.json", {"classes": stats})
        assert json.loads((tmp_path / "report.json").read_text())["classes"] == stats
        assert _leftovers(tmp_path) == ["report.json"]

    def test_report_failure_leaves_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError):
            write_report(tmp_path / "report.json", {"bad": object()})
        assert _leftovers(tmp_path) == []


class TestCheckOutputPath:
    def test_fresh_path_ok(self, tmp_path: Path) -> None:
        assert check_output_path(tmp_path / "out.tif", overwrite=False) == tmp_path / "out.tif"

    def test_exists(self, tmp_path: Path) -> None:
        (tmp_path / "out.tif").write_bytes(b"x")
        with pytest.raises(OutputError, match="already exists") as info:
            check_output_path(tmp_path / "out.tif", overwrite=False)
        assert "--overwrite" in info.value.hint and isinstance(info.value, OSError)
        assert check_output_path(tmp_path / "out.tif", overwrite=True) == tmp_path / "out.tif"

    def test_same_as_input(self, tmp_path: Path) -> None:
        (tmp_path / "in.tif").write_bytes(b"x")
        with pytest.raises(OutputError, match="is the input"):
            check_output_path(
                tmp_path / "sub" / ".." / "in.tif", overwrite=True, inputs=[tmp_path / "in.tif"]
            )

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(OutputError, match="folder .* does not exist") as info:
            check_output_path(tmp_path / "nope" / "out.tif", overwrite=False)
        assert "mkdir -p" in info.value.hint

    def test_unwritable_folder(self, tmp_path: Path, monkeypatch) -> None:
        # chmod does not stop root, so ask os.access the way a non-root user would get its answer
        monkeypatch.setattr(write_module.os, "access", lambda path, mode: False)
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(tmp_path / "out.tif", overwrite=False)

    def test_folder_as_output(self, tmp_path: Path) -> None:
        (tmp_path / "out").mkdir()
        with pytest.raises(OutputError, match="is a folder"):
            check_output_path(tmp_path / "out", overwrite=True)


class TestSegmentFlow:
    """The band-wise flow the pipeline uses, on a uint16 scene with nodata, with fake per-tile probabilities."""

    def test_scene_to_outputs(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "scene.tif")
        scene = open_scene(tmp_path / "scene.tif", bands=[3, 2, 1])
        grid = TileGrid(scene.width, scene.height, tile_size=32, overlap=8)
        names = NAMES[:2]
        counts = np.zeros(len(names), np.int64)
        stitcher = BandStitcher(grid, len(names))
        written = np.zeros((scene.height, scene.width), int)
        with (
            scene.open() as src,
            ClassMapWriter(tmp_path / "classes.tif", scene.georef, names) as classes,
            ProbabilityWriter(tmp_path / "probs.tif", scene.georef, names) as probs,
        ):
            for index, window in enumerate(grid):
                rgb, valid = read_window(scene, window, src=src)
                bright = rgb.mean(axis=0, dtype=np.float32) / 255  # "class 1" = bright pixels
                tile_probs = np.stack([1 - bright, bright]) if valid.any() else None  # skip empty tiles
                for block in stitcher.add(index, tile_probs, valid):
                    classes.write(block.window, block.labels)
                    probs.write(block.window, block.probs, block.valid)
                    counts += count_classes(block.labels, len(names))
                    written[block.window.toslices()] += 1
        assert stitcher.done and (written == 1).all()
        write_vectors(tmp_path / "classes.gpkg", tmp_path / "classes.tif", names)
        rgb, _ = read_overview(scene)
        with rasterio.open(tmp_path / "classes.tif") as src:
            labels = src.read(1)
            assert src.crs == scene.crs and src.transform == scene.transform
        write_preview(tmp_path / "preview.png", rgb, labels, names)
        write_report(tmp_path / "report.json", {"classes": class_statistics(counts, names, scene.georef)})

        full_rgb, valid = read_window(scene, Window(0, 0, scene.width, scene.height))
        bright = full_rgb.mean(axis=0, dtype=np.float32) / 255
        assert (labels[~valid] == NODATA_LABEL).all()
        np.testing.assert_array_equal(labels[valid], (bright[valid] > 0.5).astype(np.uint8))
        assert counts.sum() == valid.sum()
        assert _leftovers(tmp_path) == sorted(
            ["classes.gpkg", "classes.tif", "preview.png", "probs.tif", "report.json", "scene.tif"]
        )
