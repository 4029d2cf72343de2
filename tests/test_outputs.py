"""Tests of coninfer.outputs: the table of output kinds and the checks made before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from coninfer.errors import InputError, OutputError
from coninfer.outputs import KINDS, OUTPUTS, check_outputs


class TestCheckOutputs:
    def test_report_next_to_the_class_map(self, tmp_path: Path) -> None:
        outputs = check_outputs(tmp_path / "in.tif", {"class_map": tmp_path / "classes.TIF", "preview": str(tmp_path / "p.png")})
        assert outputs == {"class_map": tmp_path / "classes.TIF", "preview": tmp_path / "p.png",
                           "report": tmp_path / "classes.json", "class_map_aux": tmp_path / "classes.TIF.aux.xml",
                           "class_map_qml": tmp_path / "classes.qml"}

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"class_map": "classes.png"}, "--output .*classes.png: '.png' is not a class map file name"),
        ({"class_map": "some_folder"}, "--output .*some_folder: no extension is not a class map"),
        ({"probabilities": "p.jpg"}, "--probabilities .*p.jpg: '.jpg' is not a probabilities file"),
        ({"preview": "p.jpg"}, "--preview .*p.jpg: '.jpg' is not a preview file name"),
        ({"vector": "v.shp"}, "use a file name ending in .gpkg or .geojson or .json"),
        ({"probabilities": "sub/../classes.tif"}, "two outputs share one path"),
    ])  # fmt: skip
    def test_bad_names(self, tmp_path: Path, kwargs: dict, message: str) -> None:
        (tmp_path / "sub").mkdir()
        paths = {key: tmp_path / value for key, value in {"class_map": "classes.tif", **kwargs}.items()}
        with pytest.raises(InputError, match=message):
            check_outputs(tmp_path / "in.tif", paths)

    def test_file_checks(self, tmp_path: Path) -> None:
        (tmp_path / "classes.json").write_text("{}")
        with pytest.raises(OutputError, match="classes.json already exists"):
            check_outputs(tmp_path / "in.tif", {"class_map": tmp_path / "classes.tif"})
        assert check_outputs(tmp_path / "in.tif", {"class_map": tmp_path / "classes.tif"}, overwrite=True)["report"].exists()
        with pytest.raises(OutputError, match="is the input"):
            check_outputs(tmp_path / "in.tif", {"class_map": tmp_path / "out.tif", "probabilities": tmp_path / "in.tif"})

    def test_unknown_kind(self, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="unknown output kind"):
            check_outputs(tmp_path / "in.tif", {"class_map": tmp_path / "a.tif", "movie": tmp_path / "a.mp4"})


class TestTable:
    def test_every_kind_has_one_writer_role_and_an_option(self) -> None:
        for kind in OUTPUTS:
            assert kind.option.startswith("--") and kind.help
            roles = [kind.open_block_writer is not None, kind.write_after is not None]
            assert sum(roles) <= 1 and (kind.open_block_writer is None) == (kind.write_block is None)
        assert KINDS["class_map"].open_block_writer is not None and KINDS["report"].suffixes == (".json",)
