"""`coninfer cache list|clear` over work folders that real runs left (kept embeddings)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests import scenes

from coninfer._fs import locked_folder
from coninfer.cli import main
from coninfer.prompts import ClassList
from coninfer.segmenter import Segmenter
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.tile_step import load_models


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work root with the kept embeddings of two scenes."""
    root = tmp_path_factory.mktemp("cache")
    models = load_models(ClassList.parse(scenes.CLASSES), vlm="tiny-random", vfm="tiny-random", device="cpu",
                         precision="fp32", cache_dir=root / "text")
    segmenter = Segmenter(models, InferenceSettings().with_values(model_res=32))
    for name, seed in (("a", 1), ("b", 2)):
        source = scenes.rgb(root / f"{name}.tif", scenes.random_rgb(40, 50, seed=seed))
        segmenter.segment_file(source, root / f"{name}_out.tif", SceneOptions(tile_size=32, batch_size=4),
                               workdir=root / "work", keep_embeddings=True, progress=False)
    return root / "work"


def _cache(*args: str):
    return CliRunner().invoke(main, ["cache", *args])


def _names(work: Path) -> list[str]:
    return sorted(path.name for path in work.iterdir())


def test_list_names_each_folder_with_its_input_tiles_and_size(work: Path) -> None:
    result = _cache("list", "--workdir", str(work))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["folder", "input", "tiles", "queries", "size", "used"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert sorted(rows) == _names(work)
    inputs = sorted(Path(row[1]).name for row in rows.values())
    assert inputs == ["a.tif", "b.tif"] and all(row[2] == "4/4" for row in rows.values())
    assert lines[-1].startswith("2 work folder(s), ") and str(work) in lines[-1]


def test_clear_by_name_age_and_never_a_folder_in_use(work: Path, tmp_path: Path) -> None:
    first, second = _names(work)
    result = _cache("clear", "--workdir", str(work), "--older-than", "1")
    assert result.exit_code == 0 and "deleted 0 work folder(s)" in result.output and _names(work) == [first, second]
    old = time.time() - 3 * 86400
    for path in [work / second, *(work / second).rglob("*")]:
        os.utime(path, (old, old))
    assert "deleted 1 work folder(s)" in _cache("clear", "--workdir", str(work), "--older-than", "2").output
    assert _names(work) == [first]
    with locked_folder(work / first):  # a run is using it
        result = _cache("clear", "--workdir", str(work))
    assert f"kept {first}: a run is using it" in result.output and _names(work) == [first]
    result = _cache("clear", "--workdir", str(work), "no-such-folder")
    assert result.exit_code == 2 and "no work folder no-such-folder" in result.output
    assert "deleted 1 work folder(s)" in _cache("clear", "--workdir", str(work), first).output
    assert _names(work) == [] and "0 work folder(s)" in _cache("list", "--workdir", str(work)).output


def test_an_absent_root_lists_nothing(tmp_path: Path) -> None:
    result = _cache("list", "--workdir", str(tmp_path / "none"))
    assert result.exit_code == 0 and result.output.startswith("0 work folder(s)")
