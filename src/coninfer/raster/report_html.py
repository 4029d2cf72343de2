"""A report people can read: one self-contained HTML page (``classes.html``) of a segmentation run.

The page needs no network and no other file: the preview PNG is embedded as a base64 ``data:`` URI and the CSS
is inline. It shows the preview with a legend, a table of the classes (colour, name, pixels, area, share),
the input's georeference (CRS, size, transform, pixel size, bounds, GCPs when given), the tiles, the timings
and the settings, all taken from the report dict that :mod:`coninfer.scene` writes as JSON.

Element ids the tests (and scripts) rely on: ``legend``, ``classes``, ``georeference``, ``timings``,
``settings``; each class's legend item and table row carry ``data-class-id``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from coninfer.raster.read import Georef
from coninfer.raster.style import Color, class_colors, hex_color
from coninfer.raster.write import atomic_path

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 24px;
       max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: #666; margin: 0 0 16px; }
.result { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.result img { max-width: 760px; width: 100%; border: 1px solid #ccc; image-rendering: auto; }
#legend { list-style: none; padding: 0; margin: 0; }
#legend li { display: flex; align-items: center; gap: 8px; margin: 4px 0; }
.swatch { display: inline-block; width: 16px; height: 16px; border: 1px solid #333; flex: none; }
table { border-collapse: collapse; margin: 4px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; } code { font-size: 12px; word-break: break-all; }
"""
_AREA_UNITS = {"m2": "m²", "map_unit2": "map units²", "pixel": "px"}


def georeference(georef: Georef) -> dict:
    """The georeference of a scene as report fields: ``placement`` (:attr:`Georef.kind`), ``crs`` (authority
    string or WKT, None; WGS 84 for RPCs), ``size``,
    ``transform`` in affine's order ``[a, b, c, d, e, f]`` (x = a * col + b * row + c, y = d * col + e * row + f),
    ``pixel_size`` ``[x, y]`` and ``bounds`` ``[left, bottom, right, top]`` in CRS units."""
    transform = georef.grid_transform  # fitted to the GCPs or the RPC model when the raster has no geotransform
    xs = [transform.c + transform.a * x + transform.b * y for x, y in _corners(georef)]
    ys = [transform.f + transform.d * x + transform.e * y for x, y in _corners(georef)]
    crs = georef.ground_crs
    return {
        "placement": georef.kind,
        "crs": crs.to_string() if crs else None,
        "size": {"width": georef.width, "height": georef.height},
        "transform": [float(v) for v in transform[:6]],
        "pixel_size": list(georef.res),
        "bounds": [min(xs), min(ys), max(xs), max(ys)],
    }


def write_report_html(
    path: str | Path,
    summary: Mapping,
    preview: str | Path | bytes | None = None,
    colors: Sequence[Color] | None = None,
) -> Path:
    """Write the HTML report of ``summary`` (the report dict) to ``path``, atomically.

    Args:
        preview: the preview PNG (a path or its bytes), embedded as a data URI; None leaves the image out.
        colors: one RGB colour per class, as in the class map [default: ``class_colors`` of the names].
    """
    with atomic_path(path) as temporary:
        temporary.write_text(report_html(summary, preview, colors), encoding="utf-8")
    return Path(path)


def report_html(summary: Mapping, preview: str | Path | bytes | None = None,
                colors: Sequence[Color] | None = None) -> str:
    """The HTML text of :func:`write_report_html`."""
    classes = list(summary.get("classes", []))
    if colors is None:
        colors = class_colors([row["class_name"] for row in classes])
    name = Path(str(summary.get("input", "scene"))).name
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>coninfer: {_e(name)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_e(name)}</h1>",
        f'<p class="sub">coninfer segmentation of <code>{_e(summary.get("input", ""))}</code></p>',
        '<section class="result">', _preview_img(preview), _legend(classes, colors), "</section>",
        "<h2>Classes</h2>", _class_table(classes, colors),
        "<h2>Georeference</h2>", _georeference(summary),
        "<h2>Tiles and timings</h2>", _key_values("timings", {**_prefixed("tiles", summary.get("tiles", {})),
                                                              **_prefixed("", summary.get("timings_s", {}))}),
        "<h2>Settings</h2>", _key_values("settings", _flatten(summary.get("settings", {}))),
        "<h2>Outputs</h2>", _key_values("outputs", dict(summary.get("outputs", {}))),
        "</body>", "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _preview_img(preview: str | Path | bytes | None) -> str:
    if preview is None:
        return ""
    data = preview if isinstance(preview, bytes) else Path(preview).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img id="preview" alt="class map over the image" src="{uri}">'


def _legend(classes: list[Mapping], colors: Sequence[Color]) -> str:
    items = [
        f'<li data-class-id="{row["class_id"]}">{_swatch(colors[row["class_id"]])}{_e(row["class_name"])}</li>'
        for row in classes
    ]
    return '<ul id="legend">' + "".join(items) + "</ul>"


def _class_table(classes: list[Mapping], colors: Sequence[Color]) -> str:
    unit = _AREA_UNITS.get(classes[0].get("area_unit", ""), "") if classes else ""
    head = ("<thead><tr><th>id</th><th>colour</th><th>class</th><th>pixels</th>"
            f"<th>area ({_e(unit)})</th><th>area (ha)</th><th>share</th></tr></thead>")
    rows = []
    for row in classes:
        hectares = f"{row['area'] / 1e4:,.2f}" if row.get("area_unit") == "m2" else ""
        rows.append(
            f'<tr data-class-id="{row["class_id"]}"><td class="num">{row["class_id"]}</td>'
            f"<td>{_swatch(colors[row['class_id']])}</td><td>{_e(row['class_name'])}</td>"
            f'<td class="num">{row["pixels"]:,}</td><td class="num">{row["area"]:,.1f}</td>'
            f'<td class="num">{hectares}</td><td class="num">{100 * row["fraction"]:.1f} %</td></tr>'
        )
    pixels, area = sum(r["pixels"] for r in classes), sum(r["area"] for r in classes)
    foot = (f'<tfoot><tr><td></td><td></td><td>all classes</td><td class="num">{pixels:,}</td>'
            f'<td class="num">{area:,.1f}</td><td></td><td class="num">100.0 %</td></tr></tfoot>')
    return f'<table id="classes">{head}<tbody>{"".join(rows)}</tbody>{foot}</table>'


def _georeference(summary: Mapping) -> str:
    georef = dict(summary.get("georeference") or {})
    size = georef.get("size") or summary.get("size") or {}
    placement = {"gcps": "ground control points (transform fitted to them)",
                 "rpcs": "RPC model (transform fitted to it, WGS 84)", "none": "none (pixel coordinates)",
                 "geotransform": "geotransform"}.get(georef.get("placement", ""), "")
    fields = {
        "placed by": placement,
        "CRS": georef.get("crs", summary.get("crs")) or "none (pixel coordinates)",
        "size (px)": f"{size.get('width', '?')} × {size.get('height', '?')}" if size else "",
        "transform (a, b, c, d, e, f)": _numbers(georef.get("transform") or summary.get("transform")),
        "pixel size (x, y)": _numbers(georef.get("pixel_size")),
        "bounds (left, bottom, right, top)": _numbers(georef.get("bounds")),
        "GCPs": _gcps(georef.get("gcps") or summary.get("gcps")),
    }
    return _key_values("georeference", {key: value for key, value in fields.items() if value})


def _gcps(gcps) -> str:
    if not gcps:
        return ""
    return f"{len(gcps)} ground control points: " + "; ".join(json.dumps(g, default=str) for g in gcps[:20])


def _key_values(table_id: str, values: Mapping) -> str:
    rows = "".join(f"<tr><th>{_e(key)}</th><td>{_e(_format(value))}</td></tr>" for key, value in values.items())
    return f'<table id="{table_id}"><tbody>{rows}</tbody></table>'


def _flatten(values: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": value}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _prefixed(prefix: str, values: Mapping) -> dict:
    return {f"{prefix} {key}".strip(): value for key, value in values.items()}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def _numbers(values) -> str:
    return ", ".join(f"{float(v):.10g}" for v in values) if values else ""


def _swatch(color: Color) -> str:
    return f'<span class="swatch" style="background:{hex_color(color)}"></span>'


def _corners(georef: Georef) -> list[tuple[int, int]]:
    return [(0, 0), (georef.width, 0), (0, georef.height), (georef.width, georef.height)]


def _e(value) -> str:
    return html.escape(str(value), quote=True)


__all__ = ["georeference", "report_html", "write_report_html"]
