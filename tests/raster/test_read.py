"""Tests of coninfer.raster.read: scene metadata, windowed reads, masks, stretch and bad inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasters
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from conftest import require_shared
from coninfer.errors import InputError, InputFileError
from coninfer.raster import Georef, open_scene, parse_bands, read_overview, read_window, scene_is_empty
from coninfer.raster.read import window_validity

H, W, NODATA_COLS = rasters.HEIGHT, rasters.WIDTH, rasters.NODATA_COLS
FULL = Window(0, 0, W, H)


@pytest.fixture(scope="module")
def koeln_tif() -> Path:
    """The real 1000 x 1000 RGB sample in ../shared/data (skips when absent, see conftest)."""
    return require_shared("data") / "oem_koeln_50.tif"


class TestOpenScene:
    def test_rgb_uint8_metadata(self, tmp_path: Path) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")
        scene = open_scene(tmp_path / "a.tif")
        assert (scene.width, scene.height) == (W, H)
        assert scene.crs.to_epsg() == 25832
        assert scene.transform == rasters.TRANSFORM
        assert scene.res == (0.5, 0.5)
        assert scene.bands == (1, 2, 3)
        assert scene.dtype == "uint8" and scene.stretch is None
        assert scene.nodata is None and not scene.has_alpha
        assert scene.is_projected and scene.linear_units == "metre"
        assert scene.georef.pixel_area == 0.25 and scene.georef.area_unit == "m2"
        assert scene.valid_fraction == 1.0 and not scene_is_empty(scene)
        profile = scene.profile
        assert (profile["width"], profile["height"], profile["count"], profile["nodata"]) == (W, H, 1, 255)

    def test_band_selection_and_stretch(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        scene = open_scene(tmp_path / "ms.tif", bands=[3, 2, 1])
        assert scene.bands == (3, 2, 1) and scene.dtype == "uint16" and scene.nodata == 0
        # percentiles exclude nodata (0): band b holds 1000*b .. 1000*b+499
        for (low, high), band in zip(scene.stretch, (3, 2, 1), strict=True):
            assert 1000 * band <= low < high <= 1000 * band + 499
        assert scene.valid_fraction == pytest.approx((W - NODATA_COLS) / W, abs=0.02)

    def test_single_band_is_grey(self, tmp_path: Path) -> None:
        data = rasters.single_band(tmp_path / "g.tif")
        scene = open_scene(tmp_path / "g.tif", bands=[1])
        rgb, valid = read_window(scene, FULL)
        assert scene.bands == (1, 1, 1) and valid.all()
        np.testing.assert_array_equal(rgb, np.repeat(data, 3, axis=0))

    def test_png_without_georeferencing(self, tmp_path: Path) -> None:
        data = rasters.plain_png(tmp_path / "p.png")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NotGeoreferencedWarning must be silenced
            scene = open_scene(tmp_path / "p.png")
            rgb, valid = read_window(scene, FULL)
        assert scene.crs is None and scene.transform == Affine.identity()
        assert not scene.is_projected and scene.georef.area_unit == "pixel" and scene.georef.pixel_area == 1.0
        np.testing.assert_array_equal(rgb, data)
        assert valid.all()

    def test_jpeg(self, tmp_path: Path) -> None:
        rows, cols = np.mgrid[0:H, 0:W]
        smooth = np.stack([rows * 4, cols * 3, rows + cols]).astype(np.uint8)  # JPEG keeps gradients well
        Image.fromarray(np.moveaxis(smooth, 0, -1)).save(tmp_path / "p.jpg", quality=95)
        scene = open_scene(tmp_path / "p.jpg")
        rgb, valid = read_window(scene, FULL)
        assert scene.driver == "JPEG" and scene.crs is None and valid.all()
        assert np.abs(rgb.astype(int) - smooth).mean() < 3

    def test_rgba_png_alpha_is_the_mask(self, tmp_path: Path) -> None:
        data = rasters.plain_png(tmp_path / "p.png", rgba=True)
        scene = open_scene(tmp_path / "p.png")
        rgb, valid = read_window(scene, FULL)
        assert scene.has_alpha and scene.alpha_band == 4 and scene.bands == (1, 2, 3)
        assert not valid[:, :NODATA_COLS].any() and valid[:, NODATA_COLS:].all()
        np.testing.assert_array_equal(rgb[:, :, NODATA_COLS:], data[:3, :, NODATA_COLS:])
        assert not rgb[:, :, :NODATA_COLS].any()

    def test_feet_crs_area_in_square_metres(self, tmp_path: Path) -> None:
        georef = Georef(10, 10, rasterio.crs.CRS.from_epsg(2263), Affine(2.0, 0, 0, 0, -2.0, 0))
        assert georef.linear_units == "US survey foot"
        assert georef.pixel_area == pytest.approx(4 * 0.3048006096**2)

    def test_real_sample(self, koeln_tif: Path) -> None:
        scene = open_scene(koeln_tif)
        assert (scene.width, scene.height, scene.crs.to_epsg(), scene.res) == (1000, 1000, 25832, (0.5, 0.5))
        rgb, valid = read_window(scene, Window(900, 900, 200, 200))
        assert rgb.shape == (3, 200, 200) and valid[:100, :100].all() and not valid[100:, :].any()


class TestReadWindow:
    def test_uint8_as_is(self, tmp_path: Path) -> None:
        data = rasters.rgb_uint8(tmp_path / "a.tif")
        scene = open_scene(tmp_path / "a.tif")
        rgb, valid = read_window(scene, Window(5, 7, 20, 11))
        np.testing.assert_array_equal(rgb, data[:, 7:18, 5:25])
        assert rgb.dtype == np.uint8 and valid.dtype == bool and valid.all()

    def test_stretch_and_nodata(self, tmp_path: Path) -> None:
        data = rasters.multispectral_uint16(tmp_path / "ms.tif")
        scene = open_scene(tmp_path / "ms.tif", bands=[3, 2, 1])
        rgb, valid = read_window(scene, FULL)
        assert not valid[:, :NODATA_COLS].any() and valid[:, NODATA_COLS:].all()
        assert not rgb[:, :, :NODATA_COLS].any()
        inside = rgb[:, :, NODATA_COLS:].reshape(3, -1)
        # stretched to the full 8-bit range, about 2 % clipped at each end
        assert inside.min() == 0 and inside.max() == 255
        assert 0.01 < (inside == 0).mean() < 0.04 and 0.01 < (inside == 255).mean() < 0.04
        # R comes from band 3: ordering of its values is kept
        source = data[2, :, NODATA_COLS:].ravel()
        assert np.corrcoef(source, inside[0])[0, 1] > 0.99

    def test_alpha_band_mask(self, tmp_path: Path) -> None:
        rasters.rgba_uint8(tmp_path / "rgba.tif")
        scene = open_scene(tmp_path / "rgba.tif")
        _, valid = read_window(scene, FULL)
        assert scene.alpha_band == 4 and scene.bands == (1, 2, 3)
        assert not valid[:, :NODATA_COLS].any() and valid[:, NODATA_COLS:].all()

    def test_internal_mask(self, tmp_path: Path) -> None:
        rasters.masked_uint8(tmp_path / "m.tif")
        scene = open_scene(tmp_path / "m.tif")
        _, valid = read_window(scene, FULL)
        assert not valid[:, :NODATA_COLS].any() and valid[:, NODATA_COLS:].all()

    def test_window_past_edge_is_padded(self, tmp_path: Path) -> None:
        data = rasters.rgb_uint8(tmp_path / "a.tif")
        scene = open_scene(tmp_path / "a.tif")
        with scene.open() as src:
            rgb, valid = read_window(scene, Window(W - 10, H - 5, 32, 32), src=src)
        assert rgb.shape == (3, 32, 32) and valid.shape == (32, 32)
        np.testing.assert_array_equal(rgb[:, :5, :10], data[:, H - 5 :, W - 10 :])
        assert valid[:5, :10].all() and valid.sum() == 50
        assert not rgb[:, 5:, :].any() and not rgb[:, :, 10:].any()

    def test_window_outside_is_all_invalid(self, tmp_path: Path) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")
        rgb, valid = read_window(open_scene(tmp_path / "a.tif"), Window(W + 5, 0, 8, 8))
        assert rgb.shape == (3, 8, 8) and not rgb.any() and not valid.any()

    def test_overview(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        scene = open_scene(tmp_path / "ms.tif")
        rgb, valid = read_overview(scene, max_size=25)
        assert rgb.shape == (3, 18, 25) and valid.shape == (18, 25)
        assert not valid[:, :3].any() and valid[:, 4:].all()


class TestValidityWithoutRead:
    """A scene with no mask, nodata, alpha, float data or transparent palette entry (``masked`` False) gets its
    validity from the window alone: the stitch pass then reads nothing."""

    WINDOWS = (Window(5, 7, 20, 11), Window(W - 10, H - 5, 32, 32), Window(-4, -3, 16, 16), Window(W + 5, 0, 8, 8),
               Window(0, 0, W, H))

    @pytest.mark.parametrize(("make", "bands"), [(rasters.rgb_uint8, None), (rasters.paletted, None),
                                                 (lambda path: rasters.single_band(path, dtype="uint16"), [1])])
    def test_same_mask_as_read_window(self, tmp_path: Path, make, bands) -> None:
        make(tmp_path / "a.tif")
        scene = open_scene(tmp_path / "a.tif", bands=bands)
        assert not scene.masked
        for window in self.WINDOWS:
            np.testing.assert_array_equal(window_validity(scene, window), read_window(scene, window)[1])

    @pytest.mark.parametrize(("make", "bands"), [
        (rasters.rgba_uint8, None), (rasters.masked_uint8, None), (rasters.multispectral_uint16, [3, 2, 1]),
        (lambda path: rasters.float_with_fill(path, 0.0), None),
        (lambda path: rasters.single_band(path, nodata=3), [1])])
    def test_masked_scenes_need_the_read(self, tmp_path: Path, make, bands) -> None:
        make(tmp_path / "a.tif")
        scene = open_scene(tmp_path / "a.tif", bands=bands)
        assert scene.masked
        with pytest.raises(ValueError, match="needs read_window"):
            window_validity(scene, FULL)

    def test_explicit_nodata_masks_a_plain_scene(self, tmp_path: Path) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")
        assert not open_scene(tmp_path / "a.tif").masked
        assert open_scene(tmp_path / "a.tif", nodata=0).masked

    def test_transparent_palette_entry_masks(self, tmp_path: Path) -> None:
        rasters.paletted(tmp_path / "a.png")
        assert open_scene(tmp_path / "a.png").masked


class TestBadInput:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="does not exist") as info:
            open_scene(tmp_path / "nope.tif")
        assert isinstance(info.value, FileNotFoundError) and "nope.tif" in str(info.value)

    def test_folder(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="is a folder"):
            open_scene(tmp_path)

    def test_not_a_raster(self, tmp_path: Path) -> None:
        (tmp_path / "notes.tif").write_text("hello, not a raster\n")
        with pytest.raises(InputFileError, match="cannot read .*notes.tif as a raster") as info:
            open_scene(tmp_path / "notes.tif")
        assert info.value.hint and "\n" not in str(info.value)

    def test_truncated_tiff(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        content = (tmp_path / "ms.tif").read_bytes()
        (tmp_path / "cut.tif").write_bytes(content[: len(content) // 2])
        with pytest.raises(InputFileError, match="cannot read"):
            open_scene(tmp_path / "cut.tif")

    def test_too_few_bands(self, tmp_path: Path) -> None:
        rasters.single_band(tmp_path / "g.tif")
        with pytest.raises(InputError, match="has 1 colour band") as info:
            open_scene(tmp_path / "g.tif")
        assert "--bands" in info.value.hint

    def test_band_out_of_range(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        with pytest.raises(InputError, match=r"band 5 is out of range: .* has bands 1\.\.4") as info:
            open_scene(tmp_path / "ms.tif", bands=[5, 2, 1])
        assert "1-based" in info.value.hint
        with pytest.raises(InputError, match="band 0 is out of range"):
            open_scene(tmp_path / "ms.tif", bands=[0, 1, 2])

    def test_duplicate_band(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        with pytest.raises(InputError, match="band 2 is listed twice"):
            open_scene(tmp_path / "ms.tif", bands=[2, 2, 1])

    def test_wrong_number_of_bands(self, tmp_path: Path) -> None:
        rasters.multispectral_uint16(tmp_path / "ms.tif")
        with pytest.raises(InputError, match="needs 1 or 3 band indexes, got 2"):
            open_scene(tmp_path / "ms.tif", bands=[1, 2])

    def test_parse_bands(self) -> None:
        assert parse_bands("3,2,1") == (3, 2, 1)
        with pytest.raises(InputError, match="not a comma-separated list"):
            parse_bands("r,g,b")

    def test_entirely_nodata(self, tmp_path: Path) -> None:
        rasters.nodata_only(tmp_path / "empty.tif")
        scene = open_scene(tmp_path / "empty.tif")
        assert scene_is_empty(scene) and scene.valid_fraction == 0.0


class TestValidityRule:
    def test_a_pixel_is_valid_when_any_band_is(self, tmp_path: Path) -> None:
        """GDAL's dataset-mask rule (.any over the bands' masks): one channel at nodata keeps the pixel."""
        data = np.full((3, H, W), 500, np.uint16)
        data[0, :, :5] = 0  # one band at nodata: still valid
        data[:, :, 5:NODATA_COLS] = 0  # every band at nodata: invalid
        rasters.tiled(tmp_path / "t.tif", data, nodata=0)
        scene = open_scene(tmp_path / "t.tif")
        _, valid = read_window(scene, FULL)
        assert valid[:, :5].all() and not valid[:, 5:NODATA_COLS].any() and valid[:, NODATA_COLS:].all()


class TestPalette:
    def test_expanded_to_rgb_by_default(self, tmp_path: Path) -> None:
        index = rasters.paletted(tmp_path / "p.tif")
        scene = open_scene(tmp_path / "p.tif")
        assert scene.expanded_palette and scene.bands == (1, 1, 1) and scene.stretch is None
        assert scene.stats_source == "none"  # uint8 RGB without a mask: nothing to sample
        rgb, valid = read_window(scene, FULL)
        table = np.array([rasters.PALETTE[i] for i in range(4)], np.uint8)
        table[3, 3] = 255  # a GeoTIFF colour table has no alpha
        np.testing.assert_array_equal(rgb, np.moveaxis(table[index][..., :3], -1, 0))
        assert valid.all()

    def test_transparent_entry_is_invalid(self, tmp_path: Path) -> None:
        index = rasters.paletted(tmp_path / "p.png")
        scene = open_scene(tmp_path / "p.png")
        rgb, valid = read_window(scene, FULL)
        assert scene.expanded_palette
        np.testing.assert_array_equal(valid, index != 3)
        assert scene.valid_fraction == pytest.approx((index != 3).mean())
        assert (rgb[2][index == 2] == 255).all() and (rgb[:2][:, index == 2] == 0).all()

    def test_bands_1_reads_colours_not_indexes(self, tmp_path: Path) -> None:
        index = rasters.paletted(tmp_path / "p.tif")
        scene = open_scene(tmp_path / "p.tif", bands=[1])
        rgb, _ = read_window(scene, FULL)
        assert scene.expanded_palette
        assert (rgb[0][index == 0] == 255).all() and (rgb[1][index == 0] == 0).all()

    def test_paletted_band_among_three_is_refused(self, tmp_path: Path) -> None:
        rasters.paletted(tmp_path / "p.tif")
        rasters.palette_stack_vrt(tmp_path / "stack.vrt", tmp_path / "p.tif")
        with pytest.raises(InputError, match="band 1 of .* is paletted") as info:
            open_scene(tmp_path / "stack.vrt", bands=[1, 2, 3])
        assert "--bands 1" in info.value.hint
        assert not open_scene(tmp_path / "stack.vrt", bands=[2]).expanded_palette


class TestFillValues:
    @pytest.mark.parametrize("fill", [-3.4028234663852886e38, 3.4028234663852886e38, -1e38, -9999.0])
    def test_flagged_warned_and_left_out_of_the_stretch(self, tmp_path: Path, caplog, fill: float) -> None:
        rasters.float_with_fill(tmp_path / "f.tif", fill)
        with caplog.at_level("WARNING", logger="coninfer.raster.read"):
            scene = open_scene(tmp_path / "f.tif")
        assert scene.fill_values == (float(np.float32(fill)),)
        for low, high in scene.stretch:
            assert 100.0 <= low < high <= 200.0
        (record,) = caplog.records
        message = record.getMessage()
        assert "\n" not in message and "--nodata" in message and str(np.float32(fill)).rstrip("0").rstrip(".") in message

    def test_rare_minus_9999_is_not_a_fill(self, tmp_path: Path) -> None:
        data = rasters.float_with_fill(tmp_path / "f.tif", 150.0)
        data[:, 0, 0] = -9999.0  # one pixel: below 1 % of the samples
        rasters.tiled(tmp_path / "g.tif", data)
        assert open_scene(tmp_path / "g.tif").fill_values == ()

    def test_minus_9999_above_the_minimum_is_not_a_fill(self, tmp_path: Path) -> None:
        data = rasters.float_with_fill(tmp_path / "f.tif", -9999.0)
        data[:, 0, NODATA_COLS:] = -20000.0  # a lower value exists: -9999 is not the band's minimum
        rasters.tiled(tmp_path / "g.tif", data)
        assert open_scene(tmp_path / "g.tif").fill_values == ()

    def test_explicit_nodata_masks_them(self, tmp_path: Path, caplog) -> None:
        rasters.float_with_fill(tmp_path / "f.tif", -3.4028234663852886e38)
        with caplog.at_level("WARNING"):
            scene = open_scene(tmp_path / "f.tif", nodata=-3.4028235e38)
        assert scene.nodata_explicit and scene.fill_values == () and not caplog.records
        _, valid = read_window(scene, FULL)
        assert not valid[:, :NODATA_COLS].any() and valid[:, NODATA_COLS:].all()
        assert scene.valid_fraction == pytest.approx((W - NODATA_COLS) / W, abs=0.02)

    def test_nan_values_are_invalid(self, tmp_path: Path) -> None:
        rasters.float_with_fill(tmp_path / "f.tif", float("nan"))
        scene = open_scene(tmp_path / "f.tif")
        _, valid = read_window(scene, FULL)
        assert scene.fill_values == () and not valid[:, :NODATA_COLS].any()
        for low, high in scene.stretch:
            assert 100.0 <= low < high <= 200.0


class TestExplicitNodata:
    def test_replaces_the_files_nodata(self, tmp_path: Path) -> None:
        data = rasters.multispectral_uint16(tmp_path / "ms.tif", nodata=0)
        value = int(data[2, 0, NODATA_COLS])
        scene = open_scene(tmp_path / "ms.tif", bands=[3], nodata=value)
        _, valid = read_window(scene, FULL)
        assert scene.nodata == value
        np.testing.assert_array_equal(valid, data[2] != value)  # 0 is no longer nodata

    @pytest.mark.parametrize("value", [-1, 256, 1.5, float("nan")])
    def test_a_value_the_type_cannot_hold(self, tmp_path: Path, value: float) -> None:
        rasters.rgb_uint8(tmp_path / "a.tif")
        with pytest.raises(InputError, match="is not a uint8 value") as info:
            open_scene(tmp_path / "a.tif", nodata=value)
        assert "--nodata" in info.value.hint


class TestPagesAndVirtualPaths:
    def test_multipage_tiff_warns_and_names_the_syntax(self, tmp_path: Path, caplog) -> None:
        rasters.multipage(tmp_path / "m.tif")
        with caplog.at_level("WARNING", logger="coninfer.raster.read"):
            scene = open_scene(tmp_path / "m.tif")
        assert scene.pages == 3
        (record,) = caplog.records
        assert "3 pages" in record.getMessage() and "GTIFF_DIR:N:" in record.getMessage()
        rgb, _ = read_window(scene, FULL)
        assert (rgb == 50).all()

    def test_a_page_by_name(self, tmp_path: Path, caplog) -> None:
        rasters.multipage(tmp_path / "m.tif")
        with caplog.at_level("WARNING"):
            scene = open_scene(f"GTIFF_DIR:2:{tmp_path / 'm.tif'}")
        assert isinstance(scene.path, str) and not caplog.records
        rgb, _ = read_window(scene, FULL)
        assert (rgb == 100).all()

    def test_vsizip_path_is_opened_and_kept_as_text(self, tmp_path: Path) -> None:
        import zipfile

        data = rasters.rgb_uint8(tmp_path / "a.tif")
        with zipfile.ZipFile(tmp_path / "z.zip", "w") as archive:
            archive.write(tmp_path / "a.tif", "inner/a.tif")
        name = f"/vsizip/{tmp_path / 'z.zip'}/inner/a.tif"
        scene = open_scene(name)
        assert scene.path == name
        np.testing.assert_array_equal(read_window(scene, FULL)[0], data)

    def test_missing_member_of_a_virtual_path(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="cannot read /vsizip/") as info:
            open_scene(f"/vsizip/{tmp_path}/nope.zip/a.tif")
        assert "input raster" not in str(info.value) and "does not exist in the file system" in str(info.value)

    def test_double_slashes_are_kept(self) -> None:
        from coninfer.raster.source import source_path

        assert source_path("/vsicurl/https://example.com//a.tif") == "/vsicurl/https://example.com//a.tif"
        assert source_path("s3://bucket/a.tif") == "s3://bucket/a.tif"
