"""Class colours that mean something, ``--colors`` overrides, and the GIS sidecars that carry names and colours.

:func:`class_colors` picks each class's colour from its words: the first synonym (name first) holding a known
word decides its family, and the class takes the family's first shade no earlier class took::

    water, river, sea, lake, pool ...         -> blues
    tree, forest / grass, vegetation / crop   -> greens (dark, light, yellow-green shades)
    building, roof, house, wall ...           -> reds
    road, pavement, parking, street ...       -> greys
    bare, barren, soil, sand ...              -> browns
    background, clutter, other ...            -> dark greys
    anything else                             -> a fallback sequence of distinct hues

No colour is used twice (a family out of shades falls back to the distinct hues), and none is pure black,
the colour of nodata (255) in viewers that ignore the colour table's alpha.

Sidecars of a class map ``classes.tif`` (see :func:`class_map_sidecars`):

- ``classes.tif.aux.xml``: GDAL PAM with the band's ``<CategoryNames>``. rasterio cannot set category names and
  the GeoTIFF format has no tag for them, so GDAL itself keeps them in this file (``gdalinfo`` lists them
  under "Categories", ``GDALGetRasterCategoryNames`` returns them, QGIS shows them).
- ``classes.qml``: a QGIS paletted renderer (value, colour, label per class; 255 transparent), which QGIS
  loads as the layer's default style because it shares the raster's base name.
"""

from __future__ import annotations

import colorsys
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from coninfer.errors import InputError
from coninfer.prompts import ClassList

Color = tuple[int, int, int]

NODATA_VALUE = 255
"""Class-map value of invalid pixels (same as :data:`coninfer.raster.tiles.NODATA_LABEL`)."""

# family -> (words, shades in order of preference). Shades of different families never coincide.
_FAMILIES: dict[str, tuple[frozenset[str], tuple[Color, ...]]] = {
    "background": (frozenset({"background", "clutter", "other", "others", "unknown", "void", "unlabeled",
                              "unlabelled", "misc", "nodata"}),
                   ((48, 48, 48), (80, 72, 72), (60, 52, 64))),
    "water": (frozenset({"water", "river", "sea", "lake", "ocean", "pond", "pool", "reservoir", "canal",
                         "stream", "wetland"}),
              ((43, 131, 186), (8, 64, 129), (133, 192, 235), (0, 102, 255))),
    "tree": (frozenset({"tree", "forest", "wood", "woods", "woodland", "shrub", "shrubland", "bush"}),
             ((26, 110, 40), (0, 80, 50), (70, 140, 20))),
    "grass": (frozenset({"grass", "grassland", "vegetation", "meadow", "lawn", "rangeland", "pasture", "green"}),
              ((120, 205, 80), (170, 235, 150), (0, 170, 100))),
    "crop": (frozenset({"crop", "cropland", "agriculture", "agricultural", "farm", "farmland", "orchard"}),
             ((190, 210, 60), (225, 235, 130), (150, 170, 30))),
    "building": (frozenset({"building", "roof", "rooftop", "house", "wall", "urban", "built", "residential"}),
                 ((215, 25, 28), (140, 20, 20), (244, 109, 67), (200, 60, 120))),
    "road": (frozenset({"road", "pavement", "paved", "parking", "street", "highway", "impervious", "asphalt",
                        "route", "runway", "sidewalk", "motorway"}),
             ((140, 140, 140), (190, 190, 190), (105, 105, 105), (215, 215, 215))),
    "bare": (frozenset({"bare", "bareland", "barren", "soil", "sand", "dirt", "rock", "desert", "gravel"}),
             ((150, 90, 40), (200, 150, 90), (110, 60, 20), (225, 190, 140))),
}
_FALLBACK: tuple[Color, ...] = (
    (255, 215, 0), (128, 70, 170), (255, 127, 0), (230, 0, 230), (0, 220, 220), (255, 150, 200),
    (128, 128, 0), (0, 128, 128), (128, 0, 64), (255, 255, 110), (90, 60, 255), (255, 80, 80),
)  # fmt: skip
_MIN_DISTANCE = 60.0
"""Least RGB distance of a generated fallback colour from every colour already used (lowered if none fits)."""
_HEX = re.compile(r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_COLORS_HINT = "--colors"


def class_family(synonyms: Sequence[str]) -> str | None:
    """The colour family of a class from its synonyms (name first): the first synonym with a known word."""
    for synonym in synonyms:
        for word in re.split(r"[^a-z]+", synonym.casefold()):
            for family, (words, _) in _FAMILIES.items():
                if word in words or (len(word) > 3 and word.endswith("s") and word[:-1] in words):
                    return family
    return None


def class_colors(classes: ClassList | Sequence[str], overrides: Mapping[str, Color] | None = None) -> list[Color]:
    """One RGB colour per class, chosen from its name and synonyms (see the module docstring).

    Args:
        classes: a ClassList, or one string per class (``"building,roof"`` lists synonyms).
        overrides: class name -> colour (e.g. from :func:`parse_colors`); the other classes avoid these.
    """
    synonyms = _synonyms(classes)
    names = [group[0] for group in synonyms]
    overrides = dict(overrides or {})
    colors: list[Color | None] = [overrides.get(name) for name in names]
    used = {color for color in colors if color is not None}
    for index, group in enumerate(synonyms):
        if colors[index] is not None:
            continue
        family = class_family(group)
        shades = _FAMILIES[family][1] if family else ()
        color = next((shade for shade in shades if shade not in used), None) or _next_fallback(used)
        colors[index] = color
        used.add(color)
    return colors


def parse_colors(text: str, classes: ClassList | Sequence[str]) -> dict[str, Color]:
    """Parse ``--colors "building=#d7191c,water=#2b83ba"`` into class name -> colour.

    A class may be named by its name or any synonym (case-insensitive); ``,`` or ``;`` separate entries;
    colours are ``#rrggbb`` or ``#rgb``.

    Raises:
        InputError: an entry without ``=``, an unknown class, a bad colour, or a class given twice.
    """
    synonyms = _synonyms(classes)
    by_word = {word.strip().casefold(): group[0] for group in synonyms for word in group}
    overrides: dict[str, Color] = {}
    for entry in filter(str.strip, re.split(r"[,;]", text or "")):
        word, sep, value = entry.partition("=")
        if not sep:
            raise InputError(f"--colors: entry {entry.strip()!r} is not CLASS=#RRGGBB",
                             hint="pass e.g. --colors building=#d7191c,water=#2b83ba")
        name = by_word.get(word.strip().casefold())
        if name is None:
            choices = ", ".join(group[0] for group in synonyms)
            raise InputError(f"--colors: unknown class {word.strip()!r}", hint=f"name one of {choices} in --colors")
        if name in overrides:
            raise InputError(f"--colors: class {name!r} is given twice", hint="give each class once in --colors")
        overrides[name] = parse_hex(value, option=_COLORS_HINT)
    return overrides


def parse_hex(value: str, *, option: str = _COLORS_HINT) -> Color:
    """``"#d7191c"`` / ``"d7191c"`` / ``"#d11"`` -> (215, 25, 28); InputError naming ``option`` otherwise."""
    match = _HEX.match(value.strip())
    if match is None:
        raise InputError(f"{option}: bad colour {value.strip()!r}", hint=f"use #rrggbb, e.g. {option} building=#d7191c")
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(2 * d for d in digits)
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def hex_color(color: Sequence[int]) -> str:
    """(215, 25, 28) -> ``"#d7191c"``."""
    return "#" + "".join(f"{int(c):02x}" for c in color[:3])


def class_map_sidecars(class_map: str | Path) -> dict[str, Path]:
    """The sidecar paths of a class map: ``{"aux": classes.tif.aux.xml, "qml": classes.qml}``."""
    class_map = Path(class_map)
    return {"aux": class_map.with_name(class_map.name + ".aux.xml"), "qml": class_map.with_suffix(".qml")}


def pam_xml(class_names: Sequence[str]) -> str:
    """GDAL PAM (``.aux.xml``) text giving band 1 the category names (index i -> class i, 255 empty)."""
    entries = "\n".join(f"      <Category>{_text(name)}</Category>" for name in class_names)
    return (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{entries}\n    </CategoryNames>\n'
            "  </PAMRasterBand>\n</PAMDataset>\n")


def raster_qml(class_names: Sequence[str], colors: Sequence[Color]) -> str:
    """QGIS style (``.qml``) of a class map: paletted renderer on band 1, one entry (value, colour, label) per
    class, nearest-neighbour resampling, value 255 fully transparent."""
    entries = "\n".join(
        f'        <paletteEntry value="{i}" color="{hex_color(colors[i])}" alpha="255" label={quoteattr(name)}/>'
        for i, name in enumerate(class_names)
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28.0" styleCategories="AllStyleCategories">
  <pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour"
                  zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency>
        <singleValuePixelList>
          <pixelListEntry min="{NODATA_VALUE}" max="{NODATA_VALUE}" percentTransparent="100"/>
        </singleValuePixelList>
      </rasterTransparency>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <noData>
    <noDataList bandNo="1" useSrcNoData="1"/>
  </noData>
  <blendMode>0</blendMode>
</qgis>
"""


def write_class_map_sidecars(paths: Mapping[str, str | Path], class_names: Sequence[str],
                             colors: Sequence[Color]) -> dict[str, Path]:
    """Write the PAM category names to ``paths["aux"]`` and the QGIS style to ``paths["qml"]`` (either may be
    missing). The paths are written as given: pass staged temporary paths (or ``atomic_path``) for atomicity."""
    written = {}
    if "aux" in paths:
        written["aux"] = Path(paths["aux"])
        written["aux"].write_text(pam_xml(class_names), encoding="utf-8")
    if "qml" in paths:
        written["qml"] = Path(paths["qml"])
        written["qml"].write_text(raster_qml(class_names, colors), encoding="utf-8")
    return written


def _synonyms(classes: ClassList | Sequence[str]) -> list[tuple[str, ...]]:
    """Synonyms of each class, name first."""
    if isinstance(classes, ClassList):
        return [classes.synonyms(i) for i in range(classes.num_classes)]
    return [tuple(s.strip() for s in entry.split(",")) for entry in classes]


def _next_fallback(used: set[Color]) -> Color:
    """The first fallback colour not used yet: the fixed hues, then golden-angle hues far from every used
    colour (the distance needed halves when none is left), so no colour repeats."""
    for color in _FALLBACK:
        if color not in used:
            return color
    candidates = _generated_colors()
    taken = np.asarray(sorted(used), np.float64).reshape(-1, 3)
    nearest = np.sqrt(((candidates[:, None, :] - taken[None]) ** 2).sum(-1)).min(axis=1)  # (N,)
    distance = _MIN_DISTANCE
    while not (nearest >= distance).any():
        distance /= 2
    return tuple(int(c) for c in candidates[np.argmax(nearest >= distance)])


@functools.lru_cache(maxsize=1)
def _generated_colors() -> np.ndarray:
    """(N, 3) float64 distinct RGB colours along golden-angle hues at 16 saturation/value levels, no black."""
    colors = []
    for step in range(512):
        hue = (step * 0.618033988749895) % 1.0
        saturation, value = (0.85, 0.95, 0.6, 0.45)[step % 4], (0.95, 0.7, 0.9, 0.55)[(step // 4) % 4]
        colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)))
    return np.asarray(list(dict.fromkeys(colors)), np.float64)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = [
    "Color",
    "class_colors",
    "class_family",
    "class_map_sidecars",
    "hex_color",
    "pam_xml",
    "parse_colors",
    "parse_hex",
    "raster_qml",
    "write_class_map_sidecars",
]
