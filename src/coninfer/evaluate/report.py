"""Compare results with the paper: Markdown tables in the layout of Table 1 (multi-class mIoU) and Table 3
(single-class foreground IoU), plus results JSON.

Rows: our value, the paper's ConInfer value, (for the baseline method) the paper's MaskCLIP* baseline, and our value
minus the paper's value of the same method. Columns: the table's datasets in the paper's order and an Average over
the datasets we have results for (the paper's printed Average when we have all of them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coninfer._fs import atomic_write_text
from coninfer.errors import InputError, InputFileError, OutputError
from coninfer.evaluate.runner import EvalResult
from coninfer.evaluate.specs import METRIC_FOREGROUND_IOU, METRIC_MIOU, datasets_of_table, paper_results

PAPER_CONINFER = "ConInfer"
PAPER_BASELINE = "MaskCLIP* (baseline)"
TABLES = {"Table1": METRIC_MIOU, "Table3": METRIC_FOREGROUND_IOU}
_TITLES = {
    "Table1": "Table 1: multi-class segmentation, mIoU (%)",
    "Table3": "Table 3: single-class extraction, foreground IoU (%)",
}
PAPER_CONTEXT_SIZE = 50
"""Images per solver run in the paper's evaluation (mmseg's batch size)."""
_BASELINE_NAMES = {"baseline", "maskclip*", "maskclip* (baseline)", "maskclipstar", "maskclip*baseline"}


_COMPARISON_ROWS = {"gem": "GEM", "segearth-ov": "SegEarth-OV"}
"""Methods whose own row of Tables 1 and 3 is the reference (the paper's comparison methods)."""


def paper_method(method: str) -> str:
    """The paper's row name for ``method``: "MaskCLIP* (baseline)" for the baseline, "GEM" / "SegEarth-OV" for
    those comparison methods, otherwise "ConInfer"."""
    key = method.strip().lower()
    if key in _BASELINE_NAMES:
        return PAPER_BASELINE
    return _COMPARISON_ROWS.get(key, PAPER_CONINFER)


def _as_result(result: EvalResult | Mapping[str, Any]) -> EvalResult:
    return result if isinstance(result, EvalResult) else EvalResult.from_dict(result)


def _paper_row(table: str, method: str) -> dict[str, float]:
    metric = TABLES[table]
    return {r.dataset: r.value for r in paper_results(table=table, method=method) if r.metric in (metric, f"mean_{metric}")}


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def format_table(
    results: Sequence[EvalResult | Mapping[str, Any]], table: str = "Table1", *, method: str | None = None
) -> str:
    """Markdown table of ``results`` (one method; the last result per dataset wins) against the paper's ``table``."""
    if table not in TABLES:
        raise InputError(f"unknown table {table!r}", hint=f"choose one of {', '.join(TABLES)}")
    parsed = [_as_result(r) for r in results]
    method = method or (parsed[0].method if parsed else PAPER_CONINFER)
    datasets = datasets_of_table(table)
    ours: dict[str, float | None] = {r.dataset: r.value for r in parsed if r.dataset in datasets}
    reference_method = paper_method(method)
    rows = [(f"ours ({method})", {d: ours.get(d) for d in datasets})]
    paper_rows = {PAPER_CONINFER: _paper_row(table, PAPER_CONINFER)}
    if reference_method != PAPER_CONINFER:
        paper_rows[reference_method] = _paper_row(table, reference_method)
    for name, values in paper_rows.items():
        rows.append((f"paper {name}", {d: values.get(d) for d in datasets}))
    reference = paper_rows[reference_method]
    delta = {d: ours[d] - reference[d] if ours.get(d) is not None and d in reference else None for d in datasets}

    covered = [d for d in datasets if ours.get(d) is not None]
    complete = len(covered) == len(datasets)
    average_header = "Average" if complete or not covered else f"Average ({len(covered)}/{len(datasets)})"

    def average(values: dict[str, float | None], printed: float | None = None) -> float | None:
        if complete and printed is not None:
            return printed
        return _mean(values[d] for d in (covered or datasets))

    lines = [f"**{_TITLES[table]}**", "", "| | " + " | ".join(datasets) + f" | {average_header} |"]
    lines.append("|---|" + "---:|" * (len(datasets) + 1))
    for label, values in rows:
        printed = paper_rows.get(label.removeprefix("paper "), {}).get("Average")
        cells = [_cell(values[d]) for d in datasets] + [_cell(average(values, printed))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    delta_average = None
    if covered:
        delta_average = _mean(ours[d] for d in covered) - _mean(reference.get(d) for d in covered)
    cells = [_cell(delta[d], signed=True) for d in datasets] + [_cell(delta_average, signed=True)]
    lines.append(f"| Δ ours − paper {reference_method} | " + " | ".join(cells) + " |")
    deviations = [_protocol_deviation(r) for r in parsed if r.dataset in datasets]
    if any(deviations):
        lines += ["", "Not the paper's protocol, so not comparable: " + "; ".join(d for d in deviations if d) + "."]
    return "\n".join(lines) + "\n"


def _protocol_deviation(result: EvalResult) -> str:
    """What of ``result``'s run differs from the paper's evaluation (every image, batches of 50), or ''."""
    parts = []
    if result.settings.get("limit") is not None:
        parts.append(f"first {result.settings['limit']} images (--limit)")
    context_size = result.settings.get("context_size", PAPER_CONTEXT_SIZE)
    if context_size != PAPER_CONTEXT_SIZE:
        parts.append(f"context size {context_size} (paper: {PAPER_CONTEXT_SIZE})")
    return f"{result.dataset}: {', '.join(parts)}" if parts else ""


def format_report(results: Sequence[EvalResult | Mapping[str, Any]], *, method: str | None = None) -> str:
    """Table 1 and/or Table 3 (each only when a result belongs to it), separated by a blank line."""
    parsed = [_as_result(r) for r in results]
    parts = [
        format_table(parsed, table, method=method)
        for table in TABLES
        if any(r.dataset in datasets_of_table(table) for r in parsed)
    ]
    return "\n".join(parts) if parts else "No results for the datasets of Table 1 or Table 3.\n"


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
