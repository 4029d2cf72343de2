"""`coninfer segment` over many scenes: folders and VRTs as inputs, one output set per input in --output-dir,
the collection context (strips of a mosaic give the mosaic's result), --skip-existing, and clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner, Result

# the module's fixtures too: one torch thread, one CONINFER_CACHE per module (text embeddings computed once)
from test_segment import _assert_fails_cleanly, _isolated_cache, _one_thread, cache_dir  # noqa: F401

import scenes
from coninfer.cli import main

RUN = ["--tile-size", "32", "--model-res", "32", "--batch-size", "3"]
"""32 px tiles of 2 x 2 patches; an encoder batch is one tile row of the 96 px wide test scenes, so a strip's
batches hold the same tiles as the mosaic's."""
WIDTH = 96
STRIPS = (64, 64, 40)
"""Heights of the mosaic's strips: whole 32 px tile rows but the last, which ends where the mosaic ends."""


def _segment(*args: str | Path, work: Path) -> Result:
    argv = ["segment", *map(str, args), *scenes.TINY, *RUN, "--classes", scenes.CLASSES, "--workdir", str(work)]
    return CliRunner().invoke(main, argv)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _strip_transform(row: int) -> Affine:
    return scenes.TRANSFORM @ Affine.translation(0, row)


def _write_vrt(path: Path, strips: list[Path]) -> Path:
    """A GDAL VRT mosaicking ``strips`` (stacked top to bottom) into one raster."""
    rows = np.cumsum([0, *STRIPS])
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{band}">' + "".join(
            f"<SimpleSource><SourceFilename>{strip}</SourceFilename><SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{WIDTH}" ySize="{height}"/>'
            f'<DstRect xOff="0" yOff="{rows[i]}" xSize="{WIDTH}" ySize="{height}"/></SimpleSource>'
            for i, (strip, height) in enumerate(zip(strips, STRIPS, strict=True))) + "</VRTRasterBand>"
        for band in (1, 2, 3))
    geo = ", ".join(str(v) for v in scenes.TRANSFORM.to_gdal())
    path.write_text(f'<VRTDataset rasterXSize="{WIDTH}" rasterYSize="{rows[-1]}"><SRS>{scenes.CRS}</SRS>'
                    f"<GeoTransform>{geo}</GeoTransform>{bands}</VRTDataset>")
    return path


class TestCollection:
    """A 96 x 168 px mosaic (3 x 6 tiles) and its three strips (2 tile rows each), segmented as one scene, as a
    VRT over the strips, and as the strips with --context collection and --context scene."""

    @pytest.fixture(scope="class")
    @classmethod
    def runs(cls, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:  # noqa: F811 - the fixture
        folder = tmp_path_factory.mktemp("collection")
        pixels = scenes.random_rgb(sum(STRIPS), WIDTH, seed=11)
        scenes.rgb(folder / "mosaic.tif", pixels)
        strips = folder / "strips"
        strips.mkdir()
        paths, row = [], 0
        for number, height in enumerate(STRIPS):
            path = strips / f"strip{number}.tif"
            with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=height, count=3, dtype="uint8",
                               crs=scenes.CRS, transform=_strip_transform(row)) as dst:
                dst.write(np.moveaxis(pixels[row : row + height], -1, 0))
            paths.append(path)
            row += height
        _write_vrt(folder / "mosaic.vrt", paths)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CONINFER_CACHE", str(cache_dir))
            work = folder / "work"
            for name in ("mosaic.tif", "mosaic.vrt"):
                result = _segment(folder / name, "-o", folder / f"{Path(name).suffix[1:]}.tif", "--probabilities",
                                  folder / f"{Path(name).suffix[1:]}_p.tif", "-q", work=work)
                assert result.exit_code == 0, result.output
            for context in ("collection", "scene"):
                (folder / context).mkdir()
                result = _segment(strips, "--output-dir", folder / context, "--context", context,
                                  "--probabilities", "{stem}_p.tif", work=work)
                assert result.exit_code == 0, result.output
                (folder / f"{context}.out").write_text(result.stdout)
        return folder

    def test_a_vrt_is_one_input_mosaicked_by_gdal(self, runs: Path) -> None:
        assert _read(runs / "vrt.tif").tobytes() == _read(runs / "tif.tif").tobytes()
        assert _read(runs / "vrt_p.tif").tobytes() == _read(runs / "tif_p.tif").tobytes()

    def test_collection_of_strips_is_the_mosaic(self, runs: Path) -> None:
        labels, probs = _read(runs / "tif.tif"), _read(runs / "tif_p.tif")
        row = 0
        for number, height in enumerate(STRIPS):
            part = slice(row, row + height)
            np.testing.assert_array_equal(_read(runs / "collection" / f"strip{number}.tif"), labels[:, part])
            np.testing.assert_array_equal(_read(runs / "collection" / f"strip{number}_p.tif"), probs[:, part])
            row += height
        report = json.loads((runs / "collection" / "strip1.json").read_text())
        assert report["collection"] == {"scenes": 3, "tiles": 18, "index": 1}
        assert report["settings"]["scene"]["context"] == "collection"

    def test_one_mixture_per_strip_is_not_the_mosaic(self, runs: Path) -> None:
        probs = _read(runs / "tif_p.tif")
        per_strip = np.concatenate([_read(runs / "scene" / f"strip{n}_p.tif") for n in range(3)], axis=1)
        assert per_strip.shape == probs.shape
        assert not np.array_equal(per_strip, probs)

    def test_skipped_strips_still_take_part_in_the_collection(self, runs: Path, tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        for path in (runs / "collection").iterdir():
            if not path.name.startswith("strip1"):
                (out / path.name).write_bytes(path.read_bytes())
        result = _segment(runs / "strips", "--output-dir", out, "--context", "collection", "--skip-existing",
                          "--probabilities", "{stem}_p.tif", work=tmp_path / "work")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].startswith("skipped ")
        for suffix in (".tif", "_p.tif"):
            assert _read(out / f"strip1{suffix}").tobytes() == _read(runs / "collection" / f"strip1{suffix}").tobytes()

    def test_each_output_in_its_input_grid(self, runs: Path) -> None:
        row = 0
        for number, height in enumerate(STRIPS):
            with rasterio.open(runs / "collection" / f"strip{number}.tif") as src:
                assert (src.width, src.height, src.crs.to_string()) == (WIDTH, height, scenes.CRS)
                assert src.transform == _strip_transform(row)
            row += height

    def test_one_line_per_scene(self, runs: Path) -> None:
        lines = (runs / "collection.out").read_text().splitlines()
        assert [line.split(" (")[0] for line in lines[:3]] == [
            f"wrote {runs / 'collection' / f'strip{n}.tif'}" for n in range(3)]
        assert lines[3].startswith(f"3 scene(s) written to {runs / 'collection'}")
        assert len(lines) == 4


def _three(folder: Path) -> list[Path]:
    """Three 64 x 48 px scenes: a.tif, b.TIF (another CRS) and c.vrt (a VRT of a.tif)."""
    a = scenes.rgb(folder / "a.tif", scenes.random_rgb(48, 64, seed=1))
    with rasterio.open(folder / "b.TIF", "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=scenes.TRANSFORM) as dst:
        dst.write(np.moveaxis(scenes.random_rgb(48, 64, seed=2), -1, 0))
    rasterio.shutil.copy(a, folder / "c.vrt", driver="VRT")
    return [a, folder / "b.TIF", folder / "c.vrt"]


def test_a_folder_gives_one_output_set_per_raster(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _three(inputs)
    (inputs / "notes.txt").write_text("not a raster")
    (inputs / "sub").mkdir()
    scenes.rgb(inputs / "sub" / "d.tif", scenes.random_rgb(48, 64, seed=3))  # not read: no recursion
    out = tmp_path / "out"
    out.mkdir()
    result = _segment(inputs, "--output-dir", out, "--preview", "{stem}.png", "--confidence", "{stem}_conf.tif",
                      work=tmp_path / "work")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in "abc"
        for suffix in (".tif", ".json", ".qml", ".tif.aux.xml", ".png", "_conf.tif"))
    with rasterio.open(out / "b.tif") as src:
        assert src.crs.to_string() == "EPSG:32633"
    assert _read(out / "c.tif").tobytes() == _read(out / "a.tif").tobytes()  # one mixture per file: the same
    report = json.loads((out / "b.json").read_text())
    assert report["input"] == str(inputs / "b.TIF") and report["outputs"]["preview"] == str(out / "b.png")
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("wrote ") for line in lines[:3])


def test_skip_existing_continues_a_stopped_run(tmp_path: Path) -> None:
    a, b, _ = _three(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert _segment(a, b, "--output-dir", out, "-q", work=tmp_path / "work").exit_code == 0
    first = _read(out / "b.tif").tobytes()
    for name in ("b.tif", "b.json", "b.qml", "b.tif.aux.xml"):
        (out / name).unlink()  # as if the run stopped after a.tif
    before = (out / "a.tif").stat().st_mtime_ns
    result = _segment(a, b, "--output-dir", out, "--skip-existing", work=tmp_path / "work")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"skipped {a}: its outputs exist (--skip-existing)"
    assert lines[1].startswith(f"wrote {out / 'b.tif'} ") and "1 skipped" in lines[2]
    assert (out / "a.tif").stat().st_mtime_ns == before
    assert _read(out / "b.tif").tobytes() == first


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    a, b, _ = _three(tmp_path)
    (tmp_path / "out").mkdir()
    result = _segment(a, b, "--output-dir", tmp_path / "out", "-q", work=tmp_path / "work")
    assert result.exit_code == 0 and result.output == ""
    assert (tmp_path / "out" / "a.json").exists() and (tmp_path / "out" / "b.json").exists()


def test_an_output_dir_holding_the_inputs_is_refused(tmp_path: Path) -> None:
    _assert_fails_cleanly(tmp_path, ["segment", *map(str, _three(tmp_path)), "--output-dir", str(tmp_path),
                                     *scenes.TINY, *RUN, "--classes", scenes.CLASSES], r"output .*a\.tif is the input")


def _existing_report(folder: Path) -> list[str]:
    a, b, _ = _three(folder)
    (folder / "out").mkdir()
    (folder / "out" / "b.json").write_text("{}")
    return [str(a), str(b), "--output-dir", str(folder / "out")]


def _same_stem(folder: Path) -> list[str]:
    a, _, _ = _three(folder)
    (folder / "sub").mkdir()
    scenes.rgb(folder / "sub" / "a.tif", scenes.random_rgb(48, 64, seed=5))
    (folder / "out").mkdir()
    return [str(a), str(folder / "sub" / "a.tif"), "--output-dir", str(folder / "out")]


def _bad_second_input(folder: Path) -> list[str]:
    a, _, _ = _three(folder)
    (folder / "out").mkdir()
    return [str(a), str(scenes.two_bands(folder / "two.tif")), "--output-dir", str(folder / "out")]


def _empty_folder(folder: Path) -> list[str]:
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.txt").write_text("no rasters here")
    return [str(folder / "empty"), "--output-dir", str(folder)]


CASES = {
    "-o with several inputs": (lambda f: [*map(str, _three(f)[:2]), "-o", str(f / "x.tif")],
                               r"2 inputs but -o/--output names one class map \(pass --output-dir"),
    "no --output-dir": (lambda f: list(map(str, _three(f)[:2])), r"2 inputs but no --output-dir"),
    "-o and --output-dir": (lambda f: [str(_three(f)[0]), "-o", str(f / "x.tif"), "--output-dir", str(f)],
                            "not both"),
    "a folder with -o": (lambda f: [str(f), "-o", str(f / "x.tif")], "is a folder: its rasters need --output-dir"),
    "missing --output-dir": (lambda f: [str(_three(f)[0]), "--output-dir", str(f / "nowhere")],
                             r"--output-dir .*nowhere does not exist \(create it first"),
    "same stem": (_same_stem, r"share the name 'a': their outputs in .* would overwrite each other"),
    "an output exists": (_existing_report, r"output .*out/b\.json already exists \(pass --overwrite"),
    "a name without {stem}": (lambda f: [*map(str, _three(f)[:2]), "--output-dir", str(f), "--probabilities",
                                         "p.tif"], r"--probabilities p\.tif: with --output-dir an output name "
                                                   r"needs \{stem\}.*e\.g\. --probabilities \{stem\}_probabilities"),
    "a bad second input": (_bad_second_input, "two.tif has 2 colour band"),
    "an empty folder": (_empty_folder, r"folder .*empty holds no raster \(\.tif"),
}


@pytest.mark.parametrize("case", CASES)
def test_fails_cleanly(tmp_path: Path, case: str) -> None:
    setup, message = CASES[case]
    args = setup(tmp_path)
    _assert_fails_cleanly(tmp_path, ["segment", *args, *scenes.TINY, *RUN, "--classes", scenes.CLASSES,
                                     "--workdir", str(tmp_path / "work")], message)
