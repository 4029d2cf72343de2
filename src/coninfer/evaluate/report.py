"""Compare results with the paper: Markdown tables in the layout of Table 1 (multi-class mIoU), Table 3
(single-class foreground IoU) and, for the plug-and-play methods, Table 2, plus results JSON.

Rows, for every method we have results for (results of several methods can be combined): our value; the paper's
row of the same method (:func:`paper_method`: ConInfer, MaskCLIP* baseline, GEM, SegEarth-OV, decoupled = Table 4's
"No joint-learning", Table 2's MaskCLIP/SCLIP/ClearCLIP rows); and our value minus that paper row. Tables 1 and 3
also always show the paper's ConInfer, MaskCLIP*, GEM and SegEarth-OV rows side by side. A paper row that the
table itself does not print (decoupled: Table 4; ConInfer in Table 2's layout: Tables 1 and 3) names its source.
Columns: the table's datasets in the paper's order and an Average over the datasets we have results for (the
paper's printed Average when we have all of them); an average over fewer values says how many.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coninfer._fs import atomic_write_text
from coninfer.errors import InputError, InputFileError, OutputError
from coninfer.evaluate.runner import EvalResult
from coninfer.evaluate.specs import (
    METRIC_FOREGROUND_IOU,
    METRIC_MIOU,
    datasets_of_table,
    load_dataset_spec,
    paper_results,
)

PAPER_CONINFER = "ConInfer"
PAPER_BASELINE = "MaskCLIP* (baseline)"
PAPER_DECOUPLED = "No joint-learning"
TABLES = {"Table1": METRIC_MIOU, "Table3": METRIC_FOREGROUND_IOU, "Table2": None}
"""The report's tables and their one metric (Table 2 mixes mIoU and foreground IoU: each dataset's own)."""
_TITLES = {
    "Table1": "Table 1: multi-class segmentation, mIoU (%)",
    "Table3": "Table 3: single-class extraction, foreground IoU (%)",
    "Table2": "Table 2: plug-and-play on other dense CLIPs (OpenEarthMap mIoU, WHU Aerial / WBS-SI foreground IoU, %)",
}
_ROW_SOURCES = ("Table1", "Table3", "Table2", "Table4")  # where a paper row missing from a table is looked up
COMPARISON_ROWS = (PAPER_CONINFER, PAPER_BASELINE, "GEM", "SegEarth-OV")
"""Paper rows every Table 1 / Table 3 shows, whichever methods we have results for."""
PAPER_CONTEXT_SIZE = 50
"""Images per solver run in the paper's evaluation (mmseg's batch size)."""
_BASELINE_NAMES = {"baseline", "maskclip*", "maskclip* (baseline)", "maskclipstar", "maskclip*baseline"}
_DECOUPLED_NAMES = {"decoupled", "coninfer (decoupled)", "no joint-learning"}
PRIOR_SUFFIX = " + SegEarth-OV prior"
"""How a method's name says it refined SegEarth-OV's prior; its paper row is that of the method alone."""
_QUALIFIER = re.compile(r"\s*\([^()]*\)$")  # "SegEarth-OV (ConInfer re-run)" -> "SegEarth-OV"


def _paper_method_names() -> dict[str, str]:
    """Lower-cased name -> the paper's method name, for every row of Tables 1-4."""
    return {r.method.lower(): r.method for r in paper_results() if r.table in _ROW_SOURCES}


def paper_method(method: str) -> str:
    """The paper's row for our ``method``: "MaskCLIP* (baseline)" for the baseline, "No joint-learning" (Table 4)
    for the decoupled method, a row of the same name when the paper has one (GEM, SegEarth-OV, MaskCLIP+ConInfer,
    ...; a trailing qualifier in brackets such as "(ConInfer re-run)" is ignored), otherwise "ConInfer"
    (ConInfer on another prior, e.g. "ConInfer + SegEarth-OV prior")."""
    key = method.strip().lower().removesuffix(PRIOR_SUFFIX.lower())  # ConInfer refining another prior
    if key in _BASELINE_NAMES:
        return PAPER_BASELINE
    if key in _DECOUPLED_NAMES:
        return PAPER_DECOUPLED
    names = _paper_method_names()
    return names.get(key) or names.get(_QUALIFIER.sub("", key)) or PAPER_CONINFER


def _as_result(result: EvalResult | Mapping[str, Any]) -> EvalResult:
    return result if isinstance(result, EvalResult) else EvalResult.from_dict(result)


def _metric(dataset: str) -> str:
    return load_dataset_spec(dataset).metric


def _paper_row(table: str, method: str, datasets: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """The paper's values of ``method`` for ``datasets`` (+ its printed "Average" when ``table`` prints one),
    filled from the other tables where ``table`` lacks them, and the other tables used."""
    values: dict[str, float] = {}
    used: list[str] = []
    for source in (table, *(t for t in _ROW_SOURCES if t != table)):
        found = {r.dataset: r.value for r in paper_results(table=source, method=method)
                 if r.dataset in datasets and r.dataset not in values and r.metric == _metric(r.dataset)}
        if found and source != table:
            used.append(source)
        values.update(found)
    printed = [r.value for r in paper_results(table=table, method=method) if r.dataset == "Average"
               and r.metric == f"mean_{TABLES[table]}"]
    if printed:
        values["Average"] = printed[0]
    return values, used


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _average_cell(values: Mapping[str, float | None], columns: Sequence[str], signed: bool = False) -> str:
    """Mean over ``columns``; when some are missing, the mean of the others with their count."""
    present = [values[d] for d in columns if values.get(d) is not None]
    if not present:
        return "–"
    text = _cell(sum(present) / len(present), signed)
    return text if len(present) == len(columns) else f"{text} ({len(present)}/{len(columns)})"


def _methods(parsed: Sequence[EvalResult], datasets: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Our values by method (in order of appearance) and dataset; the last result per dataset wins."""
    ours: dict[str, dict[str, float | None]] = {}
    for result in parsed:
        if result.dataset in datasets:
            ours.setdefault(result.method, {})[result.dataset] = result.value
    return ours


def format_table(
    results: Sequence[EvalResult | Mapping[str, Any]], table: str = "Table1", *, method: str | None = None
) -> str:
    """Markdown table of ``results`` against the paper's ``table``; ``method`` renames every result's method."""
    if table not in TABLES:
        raise InputError(f"unknown table {table!r}", hint=f"choose one of {', '.join(TABLES)}")
    parsed = [_as_result(r) for r in results]
    datasets = datasets_of_table(table)
    ours = _methods([r if method is None else _renamed(r, method) for r in parsed], datasets) or {
        method or PAPER_CONINFER: {}}
    references = {name: paper_method(name) for name in ours}
    shown = list(dict.fromkeys([*references.values(), *(COMPARISON_ROWS if table != "Table2" else ())]))
    paper = {name: _paper_row(table, name, datasets) for name in shown}
    covered = [d for d in datasets if any(values.get(d) is not None for values in ours.values())]
    complete = len(covered) == len(datasets)
    columns = covered or list(datasets)
    header = "Average" if complete or not covered else f"Average ({len(covered)}/{len(datasets)})"

    lines = [f"**{_TITLES[table]}**", "", "| | " + " | ".join(datasets) + f" | {header} |",
             "|---|" + "---:|" * (len(datasets) + 1)]
    for name, values in ours.items():
        lines.append(_line(f"ours: {name}", [_cell(values.get(d)) for d in datasets], _average_cell(values, columns)))
    for name, (values, used) in paper.items():
        source = f" ({_table_names(used)})" if used else ""
        average = _cell(values["Average"]) if complete and "Average" in values else _average_cell(values, columns)
        lines.append(_line(f"paper {name}{source}", [_cell(values.get(d)) for d in datasets], average))
    for name, values in ours.items():
        reference = paper[references[name]][0]
        delta = {d: values[d] - reference[d] if values.get(d) is not None and d in reference else None
                 for d in datasets}
        lines.append(_line(f"Δ ours: {name} − paper {references[name]}", [_cell(delta[d], True) for d in datasets],
                           _average_cell(delta, [d for d in columns if values.get(d) is not None] or columns, True)))
    deviations = [_protocol_deviation(r) for r in parsed if r.dataset in datasets]
    if any(deviations):
        lines += ["", "Not the paper's protocol, so not comparable: " + "; ".join(d for d in deviations if d) + "."]
    return "\n".join(lines) + "\n"


def _renamed(result: EvalResult, method: str) -> EvalResult:
    return EvalResult.from_dict({**result.to_dict(), "method": method})


def _line(label: str, cells: Sequence[str], average: str) -> str:
    return f"| {label} | " + " | ".join([*cells, average]) + " |"


def _table_names(tables: Sequence[str]) -> str:
    numbers = [t.removeprefix("Table") for t in tables]
    return ("Table " if len(numbers) == 1 else "Tables ") + ", ".join(numbers)


def _protocol_deviation(result: EvalResult) -> str:
    """What of ``result``'s run differs from the paper's evaluation (every image, batches of 50), or ''."""
    parts = []
    if result.settings.get("limit") is not None:
        parts.append(f"first {result.settings['limit']} images (--limit)")
    context_size = result.settings.get("context_size", PAPER_CONTEXT_SIZE)
    prior_only = (result.settings.get("inference") or {}).get("method") == "baseline"  # no context to batch
    if context_size != PAPER_CONTEXT_SIZE and not prior_only:
        parts.append(f"context size {context_size} (paper: {PAPER_CONTEXT_SIZE})")
    return f"{result.dataset} ({result.method}): {', '.join(parts)}" if parts else ""


def _in_table(result: EvalResult, table: str) -> bool:
    """Table 2 holds the plug-and-play methods only; such a method (MaskCLIP+ConInfer, ...) on a dataset of
    Table 2 is shown there and not repeated in Table 1 or 3, unless the paper has its row there too."""
    if result.dataset not in datasets_of_table(table):
        return False
    name = paper_method(result.method)
    in_table2 = any(r.method == name for r in paper_results(table="Table2"))
    if table == "Table2":
        return in_table2
    shown_in_table2 = in_table2 and result.dataset in datasets_of_table("Table2")
    return not shown_in_table2 or any(r.method == name for r in paper_results(table=table))


def format_report(results: Sequence[EvalResult | Mapping[str, Any]], *, method: str | None = None) -> str:
    """Table 1, Table 3 and Table 2 (each only when a result belongs to it), separated by a blank line."""
    parsed = [_as_result(r) if method is None else _renamed(_as_result(r), method) for r in results]
    parts = [
        format_table([r for r in parsed if _in_table(r, table)], table)
        for table in TABLES
        if any(_in_table(r, table) for r in parsed)
    ]
    return "\n".join(parts) if parts else "No results for the datasets of Table 1, 2 or 3.\n"


def write_results_json(results: Sequence[EvalResult | Mapping[str, Any]], path: str | Path) -> Path:
    """Write results as a JSON list of result dicts (atomically); returns the path."""
    path = Path(path)
    payload = [_as_result(r).to_dict() for r in results]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise OutputError(f"cannot write results {path}: {error}", hint="check the folder is writable") from error
    return path


def read_results_json(path: str | Path) -> list[EvalResult]:
    """Results written by :func:`write_results_json` (a single result dict is accepted too)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputFileError(f"cannot read results {path}: {error}", hint="pass a results JSON file") from error
    except ValueError as error:
        raise InputError(f"{path} is not JSON: {error}", hint="pass a results JSON file") from error
    return [EvalResult.from_dict(item) for item in (data if isinstance(data, list) else [data])]
