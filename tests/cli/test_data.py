"""`coninfer data list` and `coninfer data convert` through click's CliRunner."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from coninfer.cli import main


def _deepglobe(raw):
    for folder, name, array in (("img", "7_sat.jpg", np.zeros((4, 4, 3), np.uint8)),
                                ("gt", "7_mask.png", np.array([[0, 255, 200, 10]] * 4, np.uint8))):  # fmt: skip
        (raw / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(raw / folder / name)


def test_list_shows_every_dataset():
    result = CliRunner().invoke(main, ["data", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 18
    potsdam = next(line for line in lines if line.startswith("Potsdam"))
    assert potsdam.split()[:3] == ["Potsdam", "mIoU", "6"] and "2016" in potsdam
    assert any(line.startswith("WBS-SI") and "IoU_foreground" in line for line in lines)


def test_list_layout_describes_raw_dir():
    result = CliRunner().invoke(main, ["data", "list", "--layout"])
    assert result.exit_code == 0
    assert "2_Ortho_RGB.zip" in result.output


def test_convert_case_insensitive(tmp_path):
    _deepglobe(tmp_path / "raw")
    result = CliRunner().invoke(main, ["data", "convert", "deepglobe", str(tmp_path / "raw"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "DeepGlobe" in result.output and "2 files written" in result.output
    label = np.asarray(Image.open(tmp_path / "out" / "label_cvt" / "7.png"))
    np.testing.assert_array_equal(label[0], [0, 1, 1, 0])
    assert (tmp_path / "out" / "image_cvt" / "7.jpg").is_file()


def test_convert_errors_are_one_line_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["data", "convert", "cityscapes", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "unknown dataset 'cityscapes'" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["data", "convert", "DeepGlobe", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "Error: DeepGlobe:" in result.output and "img" in result.output
