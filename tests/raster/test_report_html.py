"""Tests of coninfer.raster.report_html: a self-contained HTML report, checked as HTML and in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import rasters
from affine import Affine
from PIL import Image
from rasterio.crs import CRS

from coninfer.raster import Georef, class_statistics, open_scene
from coninfer.raster.report_html import georeference, report_html, write_report_html
from coninfer.raster.style import class_colors, hex_color
from coninfer.raster.write import write_preview

NAMES = ["building", "road", "tree", "water"]
GEOREF = Georef(400, 300, CRS.from_epsg(25832), Affine(0.5, 0.0, 346000.0, 0.0, -0.5, 5648000.0))
COLORS = class_colors(NAMES)


def _summary() -> dict:
    counts = np.array([60000, 30000, 20000, 10000])
    return {
        "input": "/data/koeln <&>.tif",
        "outputs": {"class_map": "classes.tif", "report": "classes.json"},
        "crs": "EPSG:25832",
        "size": {"width": 400, "height": 300},
        "georeference": georeference(GEOREF),
        "classes": class_statistics(counts, NAMES, GEOREF),
        "queries": NAMES,
        "settings": {"scene": {"tile_size": 448, "context": "scene"}, "models": {"vlm": "tiny-random"}},
        "tiles": {"total": 4, "empty": 0, "encoded": 4, "tiles_per_s": 2.5},
        "timings_s": {"encode_s": 1.6, "total_s": 3.25},
    }


def _preview(tmp_path: Path) -> Path:
    rgb = np.full((3, 300, 400), 120, np.uint8)
    labels = (np.arange(400)[None, :] // 100).repeat(300, axis=0).astype(np.uint8)
    return write_preview(tmp_path / "preview.png", rgb, labels, NAMES, COLORS)


class _Elements(HTMLParser):
    """(tag, attributes) of every start tag, and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _parse(text: str) -> _Elements:
    parser = _Elements()
    parser.feed(text)
    return parser


class TestStructure:
    def test_legend_table_georef_and_embedded_preview(self, tmp_path: Path) -> None:
        preview = _preview(tmp_path)
        path = write_report_html(tmp_path / "classes.html", _summary(), preview, COLORS)
        text = path.read_text(encoding="utf-8")
        page = _parse(text)
        assert text.startswith("<!DOCTYPE html>") and "http://" not in text and "https://" not in text
        assert not page.find("link") and not page.find("script")  # self-contained: nothing to fetch
        (image,) = page.find("img", id="preview")
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        assert base64.b64decode(image["src"][len(prefix):]) == preview.read_bytes()
        assert page.find("ul", id="legend") and page.find("table", id="classes")
        assert len(page.find("li")) == 4 and len(page.find("tr", **{"data-class-id": "2"})) == 1
        swatches = [a["style"] for a in page.find("span") if a.get("class") == "swatch"]
        assert swatches == [f"background:{hex_color(c)}" for c in COLORS] * 2  # legend, then table
        words = " ".join(page.text)
        assert "koeln <&>.tif" in words and "<&>" not in text.split("<body>")[1].replace("&lt;&amp;&gt;", "")
        assert "60,000" in words and "50.0 %" in words and "1.50" in words  # pixels, share, hectares
        assert "EPSG:25832" in words and "400 × 300" in words and "346000, 5648000" not in words
        assert "0.5, 0, 346000, 0, -0.5, 5648000" in words  # the transform
        assert "346000, 5647850, 346200, 5648000" in words  # the bounds
        assert "scene.tile_size" in words and "encode_s" in words and "tiles tiles_per_s" in words
        assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.html", "preview.png"]

    def test_bytes_preview_no_preview_and_default_colours(self) -> None:
        summary = _summary()
        png = io.BytesIO()
        Image.new("RGB", (4, 3), "red").save(png, format="PNG")
        assert base64.b64encode(png.getvalue()).decode() in report_html(summary, png.getvalue())
        page = _parse(report_html(summary))
        assert not page.find("img") and page.find("table", id="classes")
        swatches = [a["style"] for a in page.find("span") if a.get("class") == "swatch"][:4]
        assert swatches == [f"background:{hex_color(c)}" for c in COLORS]

    def test_not_georeferenced(self) -> None:
        summary = {**_summary(), "crs": None, "georeference": georeference(Georef(40, 30, None, Affine.identity()))}
        words = " ".join(_parse(report_html(summary)).text)
        assert "none (pixel coordinates)" in words and "40 × 30" in words

    def test_placed_by_gcps_and_by_rpcs(self, tmp_path: Path) -> None:
        """No geotransform: the report's bounds come from the grid fitted to the GCPs (their CRS) or to the RPC
        model's ground points (WGS 84), and the page says which placed the raster."""
        rasters.gcp_uint8(tmp_path / "g.tif")
        rasters.rpc_uint8(tmp_path / "r.tif")
        gcps, rpcs = (georeference(open_scene(tmp_path / name).georef) for name in ("g.tif", "r.tif"))
        assert (gcps["placement"], gcps["crs"], rpcs["placement"], rpcs["crs"]) == ("gcps", "EPSG:25832", "rpcs",
                                                                                    "EPSG:4326")
        left, bottom, right, top = gcps["bounds"]
        assert (left, top) == pytest.approx((346000.0, 5648000.0)) and right - left == pytest.approx(0.5 * rasters.WIDTH)
        left, bottom, right, top = rpcs["bounds"]
        assert 6.9 < left < right < 7.0 and 50.9 < bottom < top < 51.0  # around Köln, in degrees
        words = " ".join(_parse(report_html({**_summary(), "crs": "EPSG:25832", "georeference": gcps})).text)
        assert "ground control points" in words


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def _headless(binary: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", f"--user-data-dir={cwd / 'profile'}"]
    env = {**os.environ, "HOME": str(cwd)}
    return subprocess.run([binary, *flags, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary installed (apt-get install chromium)")
class TestInBrowser:
    def test_renders_legend_table_and_preview(self, tmp_path: Path) -> None:
        browser = _chromium()
        path = write_report_html(tmp_path / "classes.html", _summary(), _preview(tmp_path), COLORS)
        url = path.resolve().as_uri()
        dom = _headless(browser, "--dump-dom", url, cwd=tmp_path)
        assert dom.returncode == 0, dom.stderr[-2000:]
        page = _parse(dom.stdout)
        assert len([a for t, a in page.elements if t == "li"]) == 4 and page.find("ul", id="legend")
        assert len(page.find("tr", **{"data-class-id": "3"})) == 1 and "water" in " ".join(page.text)
        shot = tmp_path / "shot.png"
        result = _headless(browser, f"--screenshot={shot}", "--window-size=1280,1400", url, cwd=tmp_path)
        assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
        assert pixels.std() > 20  # not blank
        for color in COLORS:  # every class colour is on screen (legend swatches, table, blended preview)
            assert (np.abs(pixels - np.array(color)).sum(axis=1) <= 6).sum() >= 100, color
