"""`coninfer segment` end to end with the offline tiny-random models: outputs, contexts, bad inputs, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner, Result
from PIL import Image

import scenes
from coninfer._cpu import native_bf16
from coninfer._fs import TEMP_MARK
from coninfer.cli import main
from coninfer.pipeline import STOP_AFTER_BATCHES_ENV
from coninfer.raster import style


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with scenes.one_thread():
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONINFER_CACHE for the module, so the text embeddings of the classes are computed once."""
    return tmp_path_factory.mktemp("coninfer-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONINFER_CACHE", str(cache_dir))


def _args(source: Path, *extra: str, output: str = "out.tif", classes: str | None = scenes.CLASSES) -> list[str]:
    """Arguments of a quick run writing ``output`` next to ``source``; ``extra`` options come last."""
    args = ["segment", str(source), "-o", str(source.parent / output), *scenes.TINY, *scenes.FAST]
    args += ["--classes", classes] if classes is not None else []
    return [*args, "--workdir", str(source.parent / "work"), *extra]


def _run(source: Path, *extra: str, output: str = "out.tif") -> Result:
    return CliRunner().invoke(main, _args(source, *extra, output=output))


class TestOutputs:
    """One run on a 5-band uint16 scene with nodata (75 x 53 px, 0.5 m, UTM 32N; not a multiple of the tile)."""

    @pytest.fixture(scope="class")
    @classmethod
    def run(cls, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Result]:
        folder = tmp_path_factory.mktemp("outputs")
        source = scenes.multispectral(folder / "scene.tif")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CONINFER_CACHE", str(cache_dir))
            result = _run(source, "--bands", "3,2,1", "--overlap", "4", "--probabilities", str(folder / "probs.tif"),
                          "--vector", str(folder / "classes.gpkg"), "--preview", str(folder / "preview.png"), "-q",
                          output="classes.tif")
        return folder, result

    @pytest.fixture(scope="class")
    @classmethod
    def labels(cls, run: tuple[Path, Result]) -> np.ndarray:
        with rasterio.open(run[0] / "classes.tif") as src:
            return src.read(1)

    def test_succeeds_quietly(self, run: tuple[Path, Result]) -> None:
        folder, result = run
        assert result.exit_code == 0, result.output
        assert result.output == ""  # -q: no progress bars, no summary
        assert sorted(p.name for p in folder.iterdir() if p.name != "work") == [
            "classes.gpkg", "classes.json", "classes.qml", "classes.tif", "classes.tif.aux.xml", "preview.png",
            "probs.tif", "scene.tif"]
        assert list((folder / "work").iterdir()) == []  # the finished run's store is removed

    def test_same_grid_as_the_input(self, run: tuple[Path, Result]) -> None:
        with rasterio.open(run[0] / "classes.tif") as src:
            assert src.crs.to_epsg() == 32632
            assert src.transform == scenes.TRANSFORM
            assert (src.width, src.height, src.count, src.dtypes[0], src.nodata) == (75, 53, 1, "uint8", 255)

    def test_nodata_propagates(self, labels: np.ndarray) -> None:
        assert (labels[:, : scenes.NODATA_COLS] == 255).all()
        assert (labels[:, scenes.NODATA_COLS :] < 4).all()

    def test_colour_table_and_class_names(self, run: tuple[Path, Result]) -> None:
        with rasterio.open(run[0] / "classes.tif") as src:
            colormap = src.colormap(1)
            assert [colormap[i][:3] for i in range(4)] == style.class_colors(scenes.CLASS_NAMES)
            assert colormap[255][3] == 0  # nodata is transparent
            assert json.loads(src.tags()["CLASS_NAMES"]) == scenes.CLASS_NAMES
            assert [src.tags(1)[f"CLASS_{i}"] for i in range(4)] == scenes.CLASS_NAMES

    def test_probabilities(self, run: tuple[Path, Result], labels: np.ndarray) -> None:
        with rasterio.open(run[0] / "probs.tif") as src:
            assert (src.count, src.crs.to_epsg(), src.transform) == (4, 32632, scenes.TRANSFORM)
            assert list(src.descriptions) == scenes.CLASS_NAMES
            probs, mask = src.read().astype(int), src.dataset_mask()
        valid = labels != 255
        np.testing.assert_array_equal(mask > 0, valid)
        assert np.abs(probs.sum(axis=0)[valid] - 255).max() <= 2  # one query per class: a softmax, rounded
        of_label = np.take_along_axis(probs, np.minimum(labels, 3)[None], axis=0)[0]
        assert (of_label[valid] == probs.max(axis=0)[valid]).all()  # the label is the most probable class

    def test_vectors(self, run: tuple[Path, Result], labels: np.ndarray) -> None:
        with fiona.open(run[0] / "classes.gpkg") as layer:
            assert layer.crs.to_epsg() == 32632
            rows = [feature["properties"] for feature in layer]
        present = sorted(int(c) for c in np.unique(labels) if c != 255)
        assert [row["class_id"] for row in rows] == present
        assert [row["class_name"] for row in rows] == [scenes.CLASS_NAMES[c] for c in present]
        for row in rows:
            assert row["area_unit"] == "m2"
            assert row["area"] == pytest.approx((labels == row["class_id"]).sum() * scenes.PIXEL_SIZE**2)

    def test_preview(self, run: tuple[Path, Result]) -> None:
        with Image.open(run[0] / "preview.png") as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width > 75 and image.height >= 53  # the scene plus a legend panel

    def test_report(self, run: tuple[Path, Result], labels: np.ndarray) -> None:
        report = json.loads((run[0] / "classes.json").read_text())
        counts = np.bincount(labels[labels != 255], minlength=4)
        assert [row["class_name"] for row in report["classes"]] == scenes.CLASS_NAMES
        assert [row["pixels"] for row in report["classes"]] == counts.tolist()
        assert [row["area"] for row in report["classes"]] == pytest.approx((counts * scenes.PIXEL_SIZE**2).tolist())
        assert {row["area_unit"] for row in report["classes"]} == {"m2"}
        assert sum(row["fraction"] for row in report["classes"]) == pytest.approx(1.0)
        assert (report["crs"], report["size"]) == ("EPSG:32632", {"width": 75, "height": 53})
        settings = report["settings"]
        auto_dtype = "bfloat16" if native_bf16() else "float32"  # --precision auto on this CPU
        assert settings["bands"] == [3, 2, 1] and settings["device"] == "cpu" and settings["dtype"] == auto_dtype
        assert (settings["scene"]["tile_size"], settings["scene"]["overlap"], settings["scene"]["context"]) == (
            32, 4, "scene")
        assert settings["inference"]["model_res"] == 32 and settings["inference"]["method"] == "coninfer"
        assert [settings["models"][role]["fingerprint"] for role in ("vlm", "vfm")] == ["tiny-random:0"] * 2
        assert report["tiles"]["total"] == 3 * 2 and report["tiles"]["resumed_from"] == 0
        timings = report["timings_s"]
        assert set(timings) == {"encode_s", "prior_s", "solve_s", "stitch_write_s", "vector_s", "preview_s", "total_s"}
        assert all(value >= 0 for value in timings.values())
        assert timings["total_s"] >= timings["encode_s"] + timings["stitch_write_s"]


@pytest.mark.parametrize(("extra", "section", "key", "value"), [
    (["--context", "batch", "--context-size", "2"], "scene", "context", "batch"),
    (["--context", "none"], "scene", "context", "none"),
    (["--method", "baseline"], "inference", "method", "baseline"),
])  # fmt: skip
def test_other_settings_run(tmp_path: Path, extra: list[str], section: str, key: str, value: str) -> None:
    result = _run(scenes.multispectral(tmp_path / "scene.tif", count=3), *extra)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out.json").read_text())["settings"][section][key] == value
    with rasterio.open(tmp_path / "out.tif") as src:
        labels = src.read(1)
    assert (labels[:, : scenes.NODATA_COLS] == 255).all() and (labels[:, scenes.NODATA_COLS :] < 4).all()


def test_probability_threshold(tmp_path: Path) -> None:
    """With 4 classes the top probability is rarely 0.99, so most pixels fall back to the background class."""
    result = _run(scenes.multispectral(tmp_path / "scene.tif", count=3), "--prob-thd", "0.99", "--bg-index", "3")
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "out.tif") as src:
        labels = src.read(1)
    assert (labels[:, scenes.NODATA_COLS :] == 3).mean() > 0.5
    assert (labels[:, : scenes.NODATA_COLS] == 255).all()  # nodata stays nodata, whatever the threshold


def test_summary_and_overwrite(tmp_path: Path) -> None:
    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    (tmp_path / "out.tif").write_text("old")
    result = _run(source, "--overwrite")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == scenes.CLASS_NAMES  # pixels and m2 per class
    assert all(line.endswith(" m2") for line in lines[:4])
    assert lines[4].startswith(f"wrote {tmp_path / 'out.tif'}") and len(lines) == 5
    assert "encode" in result.stderr  # the progress bars
    with rasterio.open(tmp_path / "out.tif") as src:
        assert src.count == 1


def test_the_scene_is_opened_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening reads the whole file (decimated) for the stretch: the command must not pay for it twice."""
    from coninfer.raster import read

    calls, real = [], read.open_scene
    monkeypatch.setattr(read, "open_scene", lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    result = _run(scenes.multispectral(tmp_path / "scene.tif", count=3), "-q")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1


# -- bad inputs: one line on stderr, exit code 2, nothing written -------------------------------------------------


def _ms(folder: Path) -> Path:
    return scenes.multispectral(folder / "scene.tif")


def _truncated(folder: Path) -> Path:
    data = _ms(folder).read_bytes()
    (folder / "scene.tif").write_bytes(data[: len(data) // 2])
    return folder / "scene.tif"


def _text(folder: Path) -> Path:
    (folder / "scene.tif").write_text("EPSG:32632 is not a raster\n")
    return folder / "scene.tif"


def _folder(folder: Path) -> Path:
    (folder / "scene.tif").mkdir()
    return folder / "scene.tif"


def _existing(name: str) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        (folder / name).write_text("keep me")
        return _args(_ms(folder))

    return setup


BAD_INPUTS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "missing file": (lambda f: _args(f / "missing.tif"), "input raster .*missing.tif does not exist"),
    "folder, not a file": (lambda f: _args(_folder(f)), "input raster .*scene.tif is a folder"),
    "corrupt file": (lambda f: _args(_truncated(f)), "cannot read .*scene.tif as a raster"),
    "not a raster": (lambda f: _args(_text(f)), "not recognized as being in a supported file format"),
    "two bands without --bands": (lambda f: _args(scenes.two_bands(f / "two.tif")),
                                  r"has 2 colour band\(s\) but RGB needs 3 \(pass --bands"),
    "band out of range": (lambda f: _args(_ms(f), "--bands", "1,2,9"), "band 9 is out of range: .* has bands 1..5"),
    "bands not numbers": (lambda f: _args(_ms(f), "--bands", "r,g,b"), "comma-separated"),
    "empty class name": (lambda f: _args(_ms(f), classes="road;;water"), "empty name or synonym"),
    "empty synonym": (lambda f: _args(_ms(f), classes="road,;water"), "empty name or synonym"),
    "empty class list": (lambda f: _args(_ms(f), classes=""), "empty class list"),
    "duplicate class": (lambda f: _args(_ms(f), classes="road;water;Road"), "duplicate query 'Road'"),
    "one class": (lambda f: _args(_ms(f), classes="water"), "at least 2 classes"),
    "no classes": (lambda f: _args(_ms(f), classes=None), "give exactly one of --classes"),
    "missing class file": (lambda f: _args(_ms(f), "--classes-file", str(f / "c.txt"), classes=None),
                           "class file not found"),
    "bg class out of range": (lambda f: _args(_ms(f), "--bg-index", "4"), "--bg-index 4 is not a class index"),
    "output is the input": (lambda f: _args(_ms(f), output="scene.tif"), "output .*scene.tif is the input"),
    "existing output": (_existing("out.tif"), "out.tif already exists .*--overwrite"),
    "existing report": (_existing("out.json"), "out.json already exists"),
    "unknown model preset": (lambda f: _args(_ms(f), "--vlm", "clip-b99"), "--vlm 'clip-b99' is neither a preset"),
    "missing model path": (lambda f: _args(_ms(f), "--vfm", str(f / "dino.safetensors")),
                           "--vfm .*dino.safetensors' is neither a preset, an existing file"),
    "missing output folder": (lambda f: _args(_ms(f), output="no/out.tif"), "output folder .*no does not exist"),
    "unknown vector format": (lambda f: _args(_ms(f), "--vector", str(f / "v.shp")), "'.shp' is not a vector file name"),
    "class map not a GeoTIFF": (lambda f: _args(_ms(f), output="out.png"), "'.png' is not a class map file name"),
    "model resolution": (lambda f: _args(_ms(f), "--model-res", "40"), "not a multiple of the VFM patch size"),
    "entirely nodata": (lambda f: _args(scenes.all_nodata(f / "nodata.tif")), "entirely nodata"),
    # click's ranges let nan through (every comparison with nan is false): the settings catch it, by option name
    "temperature nan": (lambda f: _args(_ms(f), "--temperature", "nan"), "--temperature must be a finite number > 0"),
    "attn-lambda nan": (lambda f: _args(_ms(f), "--attn-lambda", "nan"), r"--attn-lambda must be in \[0, 1\]"),
    "prob-thd nan": (lambda f: _args(_ms(f), "--prob-thd", "nan"), r"--prob-thd must be in \[0, 1\]"),
    "odd model resolution": (lambda f: _args(_ms(f), "--model-res", "17"), "--model-res must be an even number"),
    "zero batch": (lambda f: _args(_ms(f), "--batch-size", "0"), "--batch-size must be >= 1 tile.*--batch-size 8"),
    "segearth-ov prior without weights": (lambda f: _args(_ms(f), "--prior", "segearth-ov"),
                                          "--prior segearth-ov needs --upsampler .*simfeatup-clip-b16"),
    "output is a folder": (lambda f: _args(_ms(f), output=str(_made(f / "maps"))), "--output .*maps is a folder"),
}


def _made(folder: Path) -> Path:
    folder.mkdir()
    return folder


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input(tmp_path: Path, name: str) -> None:
    setup, message = BAD_INPUTS[name]
    _assert_fails_cleanly(tmp_path, setup(tmp_path), message)


def test_unwritable_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # root may write anywhere, whatever the mode: os.access reports the folder as others would see it
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    args = _args(_ms(tmp_path), output="locked/out.tif")
    _assert_fails_cleanly(tmp_path, args, "output folder .*locked is not writable")


def _assert_fails_cleanly(folder: Path, args: list[str], message: str) -> None:
    """Exit code 2, one line "Error: ..." matching ``message`` on stderr, and no file created or changed."""
    before = _snapshot(folder)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    error = result.stderr.rstrip("\n")
    assert "\n" not in error and error.startswith("Error: ")
    assert re.search(message, error), error
    assert _snapshot(folder) == before


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


# -- resume -------------------------------------------------------------------------------------------------------


def test_resume_after_kill_gives_identical_bytes(tmp_path: Path, cache_dir: Path) -> None:
    """A run killed (SIGKILL) during the encode pass resumes from its store and writes the same bytes as a run
    that was never interrupted. 6 x 7 = 42 tiles of 32 px, 2 per encoder batch."""
    source = scenes.rgb(tmp_path / "scene.tif", scenes.random_rgb(192, 224, seed=7))

    def args(name: str, workdir: Path) -> list[str]:
        return ["segment", str(source), "-o", str(tmp_path / f"{name}.tif"), "--probabilities",
                str(tmp_path / f"{name}-probs.tif"), "--workdir", str(workdir), "--classes", scenes.CLASSES,
                *scenes.TINY, "--tile-size", "32", "--model-res", "32", "--batch-size", "2", "-q"]

    killed_work = tmp_path / "work-killed"
    # the child kills itself (SIGKILL: no clean-up at all, like a power cut) right after its 3rd stored batch
    env = {**os.environ, "CONINFER_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", STOP_AFTER_BATCHES_ENV: "3"}
    process = subprocess.run([sys.executable, "-m", "coninfer", *args("resumed", killed_work)], env=env,
                             capture_output=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert not (tmp_path / "resumed.tif").exists()
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]

    resumed = CliRunner().invoke(main, args("resumed", killed_work))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "resumed.json").read_text())["tiles"]["resumed_from"] == 3 * 2
    fresh = CliRunner().invoke(main, args("fresh", tmp_path / "work-fresh"))
    assert fresh.exit_code == 0, fresh.output
    assert (tmp_path / "resumed.tif").read_bytes() == (tmp_path / "fresh.tif").read_bytes()
    assert (tmp_path / "resumed-probs.tif").read_bytes() == (tmp_path / "fresh-probs.tif").read_bytes()


def test_gis_outputs_colours_and_class_preset(tmp_path: Path) -> None:
    """--colors reaches the colour table and the report; --confidence and --html are written; the class map has
    its QGIS style and GDAL category names next to it; --classes-preset loads a benchmark's prompt list."""
    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    first = scenes.CLASS_NAMES[0]
    result = _run(source, "--colors", f"{first}=#010203", "--confidence", str(tmp_path / "conf.tif"),
                  "--html", str(tmp_path / "report.html"), "-q")
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "out.tif") as src:
        assert src.colormap(1)[0][:3] == (1, 2, 3)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["classes"][0]["color"] == "#010203" and report["georeference"]["crs"]
    with rasterio.open(tmp_path / "conf.tif") as src:
        assert src.dtypes[0] == "uint8" and src.read(1)[:, scenes.NODATA_COLS :].min() > 0
    assert "#010203" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "out.qml").exists() and (tmp_path / "out.tif.aux.xml").exists()

    preset = _run(source, "--classes-preset", "openearthmap", "--overwrite", "-q", output="oem.tif")
    assert preset.exit_code == 2 and "exactly one of --classes" in preset.output  # --classes given as well
    args = [a for a in _args(source, "-q", output="oem.tif", classes=None)]
    result = CliRunner().invoke(main, [*args, "--classes-preset", "openearthmap"])
    assert result.exit_code == 0, result.output
    names = [row["class_name"] for row in json.loads((tmp_path / "oem.json").read_text())["classes"]]
    assert "building" in names and "water" in names


def test_bad_colors_fail_before_any_work(tmp_path: Path) -> None:
    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    result = _run(source, "--colors", "lava=#ff0000")
    assert result.exit_code == 2 and "--colors" in result.output and not (tmp_path / "out.tif").exists()


def test_a_run_holding_the_outputs_stops_a_second_one(tmp_path: Path) -> None:
    """The output lock: --overwrite does not silence it, and nothing is written."""
    from coninfer._fs import hold_outputs

    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    with hold_outputs([tmp_path / "out.tif"]):
        result = _run(source, "--overwrite")
    assert result.exit_code == 2 and f"another run (process {os.getpid()}) is writing" in result.output
    assert scenes.files_in(tmp_path) == {"scene.tif"}


def _random_upsampler(path: Path, feature_dim: int) -> Path:
    """SimFeatUp weights in the released key format (``upsampler.`` prefix), random, as safetensors."""
    import torch
    from safetensors.torch import save_file

    from coninfer.encoders.simfeatup import SimFeatUp

    torch.manual_seed(0)
    state = {f"upsampler.{k}": v.contiguous() for k, v in SimFeatUp(feature_dim).state_dict().items()}
    save_file(state, str(path))
    return path


def test_segearth_ov_prior_under_coninfer(tmp_path: Path) -> None:
    """--prior segearth-ov: SimFeatUp-upsampled, [CLS]-debiased logits pooled to the patch grid as the prior."""
    from coninfer.encoders.tiny import build_tiny_clip

    weights = _random_upsampler(tmp_path / "jbu.safetensors", build_tiny_clip().embed_dim)
    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    grid = ["--tile-size", "64", "--model-res", "64"]  # 4 x 4 patches: the JBU's reflect padding needs >= 3
    missing = _run(source, "--prior", "segearth-ov", *grid)
    assert missing.exit_code == 2 and "--upsampler" in missing.output
    result = _run(source, "--prior", "segearth-ov", "--upsampler", str(weights), *grid, "-q",
                  "--probabilities", str(tmp_path / "p1.tif"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["settings"]["inference"]["prior"] == "segearth-ov"
    assert report["settings"]["models"]["upsampler"]["fingerprint"].startswith("local:")
    plain = _run(source, *grid, "-q", "--probabilities", str(tmp_path / "p2.tif"), output="plain.tif")
    assert plain.exit_code == 0, plain.output
    with rasterio.open(tmp_path / "p1.tif") as a, rasterio.open(tmp_path / "p2.tif") as b:
        assert (a.read() != b.read()).any()  # another prior, other probabilities


def test_a_run_removes_temporaries_left_by_a_killed_run_on_its_outputs(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".out.tif.{int(dead.stdout)}-0123abcd{TEMP_MARK}.stage.tif"
    stale.write_text("left by SIGKILL")
    result = _run(scenes.multispectral(tmp_path / "scene.tif", count=3), "-q")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


@pytest.mark.parametrize(("name", "code"), [("TERM", 143), ("INT", 130)])
def test_sigterm_and_ctrl_c_exit_cleanly(tmp_path: Path, cache_dir: Path, name: str, code: int) -> None:
    """SIGTERM (timeout, docker stop, schedulers) exits 143 and Ctrl-C 130, one line, no file left behind."""
    from coninfer.pipeline import STOP_SIGNAL_ENV

    source = scenes.rgb(tmp_path / "scene.tif", scenes.random_rgb(96, 96, seed=7))
    env = {**os.environ, "CONINFER_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", STOP_AFTER_BATCHES_ENV: "1",
           STOP_SIGNAL_ENV: name}
    args = ["segment", str(source), "-o", str(tmp_path / "out.tif"), "--workdir", str(tmp_path / "work"),
            "--classes", scenes.CLASSES, *scenes.TINY, "--tile-size", "32", "--model-res", "32", "--batch-size", "2",
            "-q"]
    # a shell's background job inherits SIGINT ignored, and Python then keeps it ignored: give the child the default
    process = subprocess.run([sys.executable, "-m", "coninfer", *args], env=env, capture_output=True, text=True,
                             timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.returncode == code, process.stderr[-2000:]
    assert len(process.stderr.strip().splitlines()) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"scene.tif", "work"}


def test_nodata_option_and_the_input_reading_report(tmp_path: Path) -> None:
    source = scenes.multispectral(tmp_path / "scene.tif", count=3)
    result = _run(source, "--nodata", "0", "-q")
    assert result.exit_code == 0, result.output
    reading = json.loads((tmp_path / "out.json").read_text())["input_reading"]
    assert reading["nodata"] == 0 and reading["nodata_explicit"] and reading["georeference"] == "geotransform"


def test_gcp_georeferencing_is_kept_in_every_output(tmp_path: Path) -> None:
    """A scene placed by GCPs (no geotransform): the class map carries the same GCPs and CRS, the vectors are in
    that CRS, and the report's areas are in m², not pixels."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "raster"))
    import rasters

    source = tmp_path / "gcp.tif"
    rasters.gcp_uint8(source)
    result = _run(source, "--vector", str(tmp_path / "v.gpkg"), "-q")
    assert result.exit_code == 0, result.output
    with rasterio.open(source) as src, rasterio.open(tmp_path / "out.tif") as out:
        (gcps_in, crs_in), (gcps_out, crs_out) = src.gcps, out.gcps
        assert crs_out == crs_in and [(g.row, g.col, g.x, g.y) for g in gcps_out] == [
            (g.row, g.col, g.x, g.y) for g in gcps_in]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["input_reading"]["georeference"] == "gcps" and report["crs"] == "EPSG:25832"
    assert {row["area_unit"] for row in report["classes"]} == {"m2"}
    with fiona.open(tmp_path / "v.gpkg") as layer:
        assert layer.crs and next(iter(layer))["geometry"]["coordinates"][0][0][0][0] > 1000  # metres, not px


def test_run_too_large_for_memory_stops_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory check runs before the work folder is made: one line naming the options, nothing left."""
    from coninfer import memory

    monkeypatch.setattr(memory, "available_host_memory", lambda: 1024)
    _assert_fails_cleanly(tmp_path, _args(_ms(tmp_path)), "--tile-size .* with --batch-size .* of host memory")
    assert not (tmp_path / "work").exists()


def test_compile_reaches_both_encoders_and_not_the_resume_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`segment --compile` compiles both encoders (plumbing: torch.compile itself is tested in test_tile_step) and
    resumes the store of an eager run: compiling changes no weight and no resume key."""
    import coninfer.tile_step as tile_step

    compiled: list[str] = []
    monkeypatch.setattr(tile_step, "compile_encoder", lambda encoder: compiled.append(type(encoder).__name__))
    monkeypatch.setattr(tile_step, "check_compile_available", lambda device: None)
    source = _ms(tmp_path)
    eager = _run(source, "--keep-embeddings", "-q")
    assert eager.exit_code == 0 and compiled == [], eager.output
    result = _run(source, "--compile", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(compiled) == ["DenseCLIP", "DenseVFM"]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["tiles"]["resumed_from"] == report["tiles"]["total"] - report["tiles"]["empty"]
