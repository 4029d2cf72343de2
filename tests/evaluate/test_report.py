"""Markdown comparison tables and results JSON."""

from __future__ import annotations

import json

import pytest

from coninfer.errors import InputError
from coninfer.evaluate.report import format_report, format_table, read_results_json, write_results_json
from coninfer.evaluate.runner import EvalResult


def result(dataset, value, method="ConInfer", metric="mIoU", settings=None):
    return EvalResult(dataset, method, metric, value, {}, 90.0, 10, settings or {})


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table1_puts_ours_next_to_the_paper():
    table = format_table([result("OpenEarthMap", 42.0), result("Potsdam", 49.0)], "Table1")
    header = _row(table, "|")  # the header row starts with an empty cell
    assert header[1:4] == ["OpenEarthMap", "LoveDA", "iSAID"] and header[-1] == "Average (2/8)"
    ours = _row(table, "ours: ConInfer")
    assert ours[1] == "42.00" and ours[2] == "–" and ours[-1] == "45.50"
    paper = _row(table, "paper ConInfer")
    assert paper[1] == "41.95" and paper[4] == "49.99" and paper[-1] == "45.97"
    delta = _row(table, "Δ ours: ConInfer − paper ConInfer")
    assert delta[1] == "+0.05" and delta[4] == "-0.99" and delta[-1] == "-0.47"
    # the paper's comparison rows side by side, averaged over the same datasets
    assert _row(table, "paper GEM")[1] == "29.96" and _row(table, "paper GEM")[-1] == "34.10"
    assert _row(table, "paper SegEarth-OV")[4] == "47.94" and _row(table, "paper MaskCLIP* (baseline)")[1] == "32.46"
    assert "No joint-learning" not in table  # only with a decoupled result


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
    assert _row(table, "Δ ours: baseline − paper MaskCLIP* (baseline)")[1] == "-0.76"


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
    assert paper_method("baseline") == "MaskCLIP* (baseline)"
    assert paper_method("ConInfer (decoupled)") == "No joint-learning"
    assert paper_method("SegEarth-OV (ConInfer re-run)") == "SegEarth-OV"
    assert paper_method("MaskCLIP+SegEarth-OV") == "MaskCLIP+SegEarth-OV"
    assert paper_method("ConInfer + SegEarth-OV prior") == "ConInfer" and paper_method("something else") == "ConInfer"


def test_methods_side_by_side_each_against_its_paper_row():
    """GEM, SegEarth-OV, MaskCLIP*, decoupled and ConInfer results in one table, one Δ row each."""
    results = [result("OpenEarthMap", 42.0), result("Vaihingen", 30.0),
               result("OpenEarthMap", 30.0, "GEM"), result("OpenEarthMap", 38.0, "SegEarth-OV"),
               result("OpenEarthMap", 33.0, "baseline"), result("OpenEarthMap", 37.0, "ConInfer (decoupled)"),
               result("Vaihingen", 32.0, "ConInfer (decoupled)")]
    table = format_table(results, "Table1")
    header = _row(table, "|")
    oem, vaihingen = header.index("OpenEarthMap"), header.index("Vaihingen")
    assert header[-1] == "Average (2/8)"
    expected = {"ConInfer": ("ConInfer", "+0.05"), "GEM": ("GEM", "+0.04"), "SegEarth-OV": ("SegEarth-OV", "+0.19"),
                "baseline": ("MaskCLIP* (baseline)", "+0.54"), "ConInfer (decoupled)": ("No joint-learning", "+0.77")}
    for method, (paper, delta) in expected.items():
        assert _row(table, f"Δ ours: {method} − paper {paper}")[oem] == delta, method
    decoupled = _row(table, "paper No joint-learning (Table 4)")  # not printed in Table 1: its source is named
    assert (decoupled[oem], decoupled[vaihingen], decoupled[header.index("Potsdam")]) == ("36.23", "32.80", "–")
    assert _row(table, "Δ ours: ConInfer (decoupled)")[vaihingen] == "-0.80"
    assert _row(table, "ours: GEM")[-1] == "30.00 (1/2)"  # an average over fewer datasets says so
    assert _row(table, "Δ ours: GEM")[-1] == "+0.04"  # over the datasets GEM has


def test_table2_holds_the_plug_and_play_rows():
    results = [result("OpenEarthMap", 25.0, "MaskCLIP+SegEarth-OV"),
               result("WBS-SI", 50.0, "ClearCLIP+ConInfer", "IoU_foreground"),
               result("Potsdam", 20.0, "MaskCLIP+SegEarth-OV"), result("Potsdam", 49.0)]
    report = format_report(results)
    table2 = report[report.index("**Table 2"):]
    assert _row(table2, "|")[1:4] == ["OpenEarthMap", "WHU_Aerial", "WBS-SI"]
    assert _row(table2, "paper MaskCLIP+SegEarth-OV")[1:4] == ["25.94", "38.18", "47.75"]
    assert _row(table2, "Δ ours: ClearCLIP+ConInfer − paper ClearCLIP+ConInfer")[3] == "-6.08"
    table1 = report[: report.index("**Table 2")]
    assert "ClearCLIP" not in table1  # a Table-2 dataset's plug-and-play result is not repeated
    potsdam = _row(table1, "|").index("Potsdam")
    assert _row(table1, "ours: MaskCLIP+SegEarth-OV")[potsdam] == "20.00"  # Potsdam is in no Table 2 column
    assert "OpenEarthMap" in table1 and _row(table1, "ours: MaskCLIP+SegEarth-OV")[1] == "–"


def test_context_size_is_flagged_only_where_there_is_context():
    settings = {"context_size": 1, "limit": None}
    prior_only = {**settings, "inference": {"method": "baseline"}}
    report = format_report([result("Potsdam", 40.0, "SegEarth-OV", settings=prior_only),
                            result("UDD5", 40.0, settings=settings)])
    assert "UDD5 (ConInfer): context size 1 (paper: 50)" in report and "Potsdam (" not in report
