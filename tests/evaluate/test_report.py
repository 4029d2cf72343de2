"""Markdown comparison tables and results JSON."""

from __future__ import annotations

import json

import pytest

from coninfer.errors import InputError
from coninfer.evaluate.report import format_report, format_table, read_results_json, write_results_json
from coninfer.evaluate.runner import EvalResult


def result(dataset, value, method="ConInfer", metric="mIoU"):
    return EvalResult(dataset, method, metric, value, {}, 90.0, 10, {})


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table1_puts_ours_next_to_the_paper():
    table = format_table([result("OpenEarthMap", 42.0), result("Potsdam", 49.0)], "Table1")
    header = _row(table, "|")  # the header row starts with an empty cell
    assert header[1:4] == ["OpenEarthMap", "LoveDA", "iSAID"] and header[-1] == "Average (2/8)"
    ours = _row(table, "ours (ConInfer)")
    assert ours[1] == "42.00" and ours[2] == "–" and ours[-1] == "45.50"
    paper = _row(table, "paper ConInfer")
    assert paper[1] == "41.95" and paper[4] == "49.99" and paper[-1] == "45.97"
    delta = _row(table, "Δ ours − paper ConInfer")
    assert delta[1] == "+0.05" and delta[4] == "-0.99" and delta[-1] == "-0.47"
    assert "MaskCLIP*" not in table


def test_complete_table_uses_the_printed_average():
    values = {"WHU_Aerial": 58.54, "WHU_Sat_II": 39.35, "Inria": 55.65, "xBD_pre": 41.34, "CHN6-CUG": 40.0,
              "DeepGlobe": 19.85, "Massachusetts": 12.16, "SpaceNet": 24.02, "WBS-SI": 61.38}  # fmt: skip
    table = format_table([result(d, v, metric="IoU_foreground") for d, v in values.items()], "Table3")
    assert _row(table, "|")[-1] == "Average"
    assert _row(table, "paper ConInfer")[-1] == "39.14"
    assert all(cell == "+0.00" for cell in _row(table, "Δ")[1:-1])


def test_baseline_rows_compare_with_maskclip_star():
    table = format_table([result("WHU_Aerial", 45.0, method="baseline", metric="IoU_foreground")], "Table3")
    assert _row(table, "paper MaskCLIP* (baseline)")[1] == "45.76"
    assert _row(table, "paper ConInfer")[1] == "58.54"
    assert _row(table, "Δ ours − paper MaskCLIP* (baseline)")[1] == "-0.76"


def test_report_has_only_tables_with_results():
    report = format_report([result("UDD5", 40.0)])
    assert "Table 1" in report and "Table 3" not in report
    report = format_report([result("UDD5", 40.0), result("Inria", 50.0, metric="IoU_foreground")])
    assert "Table 1" in report and "Table 3" in report


def test_unknown_table():
    with pytest.raises(InputError, match="Table7"):
        format_table([], "Table7")


def test_results_json_round_trip(tmp_path):
    results = [result("UDD5", 40.0), EvalResult("Inria", "ConInfer", "IoU_foreground", None, {"building": None}, None, 0, {})]
    path = write_results_json(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text())[0]["value"] == 40.0
    assert read_results_json(path) == results
    assert format_table([r.to_dict() for r in results], "Table1") == format_table(results, "Table1")


def test_comparison_methods_are_compared_with_their_own_paper_row():
    from coninfer.evaluate.report import paper_method

    assert paper_method("GEM") == "GEM" and paper_method("SegEarth-OV") == "SegEarth-OV"
    assert paper_method("baseline") == "MaskCLIP* (baseline)" and paper_method("ConInfer (decoupled)") == "ConInfer"
