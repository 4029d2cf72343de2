"""Tests of coninfer.raster.style: colours chosen from class names, --colors, PAM and QGIS sidecars."""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from coninfer.class_presets import class_preset, preset_names
from coninfer.errors import InputError
from coninfer.prompts import ClassList
from coninfer.raster.style import (
    class_colors,
    class_family,
    class_map_sidecars,
    hex_color,
    pam_xml,
    parse_colors,
    parse_hex,
    raster_qml,
)

DEMO = ClassList.parse("building,roof;road,parking lot;tree;low vegetation,grass;water;bare soil")


def _hue(color) -> tuple[float, float, float]:
    """(hue in degrees, saturation, value) of an RGB colour."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in color))
    return h * 360, s, v


class TestClassColors:
    def test_demo_classes_mean_something(self) -> None:
        building, road, tree, grass, water, bare = class_colors(DEMO)
        assert _hue(building)[0] < 15 or _hue(building)[0] > 340  # red
        assert _hue(road)[1] == 0  # grey
        for green in (tree, grass):
            assert 80 < _hue(green)[0] < 160 and _hue(green)[1] > 0.3
        assert sum(abs(a - b) for a, b in zip(tree, grass, strict=True)) > 100  # two distinguishable greens
        assert 190 < _hue(water)[0] < 225 and water[2] > water[0]  # blue
        assert 20 < _hue(bare)[0] < 40 and _hue(bare)[2] < 0.7  # brown: dark orange

    @pytest.mark.parametrize(
        ("synonyms", "family"),
        [(["road", "parking lot"], "road"), (["trees"], "tree"), (["impervious surface"], "road"),
         (["swimming_pool"], "water"), (["Low_Vegetation"], "grass"), (["clutter", "background"], "background"),
         (["background", "forest", "water"], "background"), (["car"], None), (["vehicle", "road"], "road"),
         (["agricultural"], "crop"), (["bareland", "barren"], "bare")],
    )
    def test_family_from_first_matching_synonym(self, synonyms: list[str], family: str | None) -> None:
        assert class_family(synonyms) == family

    def test_synonyms_count(self) -> None:
        assert class_colors(["parking lot,road"]) == class_colors(["road"])
        assert class_colors(ClassList.parse("thing,roof;x")) == [(215, 25, 28), class_colors(["car"])[0]]

    @pytest.mark.parametrize("name", preset_names())
    def test_presets_never_repeat_nor_use_black(self, name: str) -> None:
        colors = class_colors(ClassList.parse(class_preset(name)))
        assert len(set(colors)) == len(colors) and (0, 0, 0) not in colors

    def test_same_family_takes_the_next_shade(self) -> None:
        first, second, third = class_colors(["tree", "forest", "woodland"])
        assert len({first, second, third}) == 3
        assert all(80 < _hue(c)[0] < 160 for c in (first, second, third))

    def test_fallback_never_repeats(self) -> None:
        names = ["water", "road"] + [f"thing {i}" for i in range(253)]
        colors = class_colors(names)
        assert len(set(colors)) == 255 and (0, 0, 0) not in colors
        assert class_colors(names[:10]) == colors[:10]  # prefix-stable

    def test_overrides_win_and_are_avoided(self) -> None:
        overrides = parse_colors("tree=#2b83ba", DEMO)  # the water blue, given to the trees
        colors = class_colors(DEMO, overrides)
        assert colors[2] == (43, 131, 186) and colors[4] != (43, 131, 186)
        assert 190 < _hue(colors[4])[0] < 230  # the water takes the next blue


class TestParseColors:
    def test_names_synonyms_case_and_separators(self) -> None:
        got = parse_colors(" Roof=#D7191C; water=2b83ba , grass=#0f0", DEMO)
        assert got == {"building": (215, 25, 28), "water": (43, 131, 186), "low vegetation": (0, 255, 0)}
        assert parse_colors("", DEMO) == {}

    @pytest.mark.parametrize(
        ("text", "message"),
        [("lava=#ff0000", "unknown class 'lava'"), ("water=#12345", "bad colour '#12345'"),
         ("water=blue", "bad colour 'blue'"), ("water", "is not CLASS=#RRGGBB"),
         ("water=#000000,water=#ffffff", "given twice")],
    )
    def test_errors_name_the_option(self, text: str, message: str) -> None:
        with pytest.raises(InputError, match=message) as info:
            parse_colors(text, DEMO)
        assert "--colors" in str(info.value) and "\n" not in str(info.value)

    def test_unknown_class_lists_the_classes(self) -> None:
        with pytest.raises(InputError) as info:
            parse_colors("lava=#ff0000", DEMO)
        assert "building, road, tree, low vegetation, water, bare soil" in info.value.hint
        assert "--colors" in info.value.hint

    def test_hex_round_trip(self) -> None:
        assert parse_hex("#d7191c") == (215, 25, 28) and hex_color((215, 25, 28)) == "#d7191c"


class TestSidecars:
    def test_paths(self) -> None:
        assert class_map_sidecars("out/classes.tif") == {
            "aux": Path("out/classes.tif.aux.xml"), "qml": Path("out/classes.qml")}

    def test_pam_category_names(self) -> None:
        root = ET.fromstring(pam_xml(["building", "water & <river>"]))
        band = root.find("PAMRasterBand")
        assert band.get("band") == "1"
        assert [c.text for c in band.find("CategoryNames")] == ["building", "water & <river>"]

    def test_qml_palette_and_transparent_nodata(self) -> None:
        names = ["building", 'say "hi" & <go>']
        root = ET.fromstring(raster_qml(names, [(215, 25, 28), (1, 2, 3)]))
        renderer = root.find("pipe/rasterrenderer")
        assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
        entries = [(e.get("value"), e.get("color"), e.get("alpha"), e.get("label"))
                   for e in renderer.find("colorPalette")]
        assert entries == [("0", "#d7191c", "255", "building"), ("1", "#010203", "255", names[1])]
        transparent = renderer.find("rasterTransparency/singleValuePixelList/pixelListEntry")
        assert (transparent.get("min"), transparent.get("max"), transparent.get("percentTransparent")) == (
            "255", "255", "100")
