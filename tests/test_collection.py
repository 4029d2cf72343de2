"""Many scenes under torch.distributed: 2 Gloo processes segment 3 scenes (whole scenes per rank) and 1 scene
(both ranks on its tiles) into the outputs one process writes, byte for byte, for the scene and collection
contexts, and a bad input on one rank stops both; a stopped collection resumes to the same bytes; and the pure
parts of :mod:`coninfer.collection` (input folders, shares of scenes, the store view)."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.distributed as tdist
from tests import scenes
from tests.test_distributed import spawn
from tests.test_distributed_scene import _segmenter  # the same tiny models and settings

from coninfer import collection, distributed
from coninfer.errors import InputError
from coninfer.segmenter import Segmenter
from coninfer.settings import SceneOptions
from coninfer.store import TileStore

SIZES = ((64, 96), (48, 80), (40, 64))  # (height, width): 6, 6 and 4 tiles of 32 px
CASES = {  # name -> (context, how many of the scenes)
    "scene3": ("scene", 3), "collection3": ("collection", 3), "collection1": ("collection", 1)}
OPTIONS = SceneOptions(tile_size=32, batch_size=2, solver_chunk_tiles=2)  # chunks of 2 tiles: real rank shares
JOIN_TIMEOUT_S = 240.0


def _run_cases(segmenter: Segmenter, folder: Path, tag: str, dist: distributed.Dist) -> dict:
    reports = {}
    inputs = sorted((folder / "in").iterdir())
    for name, (context, count) in CASES.items():
        out = folder / f"{name}-{tag}"
        if dist.is_main:
            out.mkdir()
        distributed.barrier(dist)
        reports[name] = segmenter.segment_files(inputs[:count], out, dataclasses.replace(OPTIONS, context=context),
                                                workdir=folder / f"work-{tag}", progress=False, dist=dist,
                                                probabilities="{stem}_p.tif")
    return reports


def worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)  # the reference runs with one thread too: same float32 arithmetic
    out = Path(folder)
    # a file rendezvous: no port to race for with other test runs on the machine
    tdist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=90))
    dist = distributed.Dist(rank, world, rank, "gloo", torch.device("cpu"))
    try:
        segmenter = _segmenter(out / "text")
        reports = _run_cases(segmenter, out, f"world{world}", dist)
        bad = [*sorted((out / "in").iterdir())[:2], out / "two.tif"]  # the third scene goes to rank 1
        try:
            segmenter.segment_files(bad, out / "bad", OPTIONS, workdir=out / "work-bad", progress=False, dist=dist)
        except Exception as error:  # noqa: BLE001 - recorded for the test
            reports["error"] = [type(error).__name__, str(error)]
        (out / f"reports-{rank}.json").write_text(json.dumps(reports))
    finally:
        distributed.teardown()  # destroys the group and frees it while the interpreter is whole


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three scenes and the one-process outputs of every case."""
    folder = tmp_path_factory.mktemp("dist-collection")
    (folder / "in").mkdir()
    for number, (height, width) in enumerate(SIZES):
        scenes.rgb(folder / "in" / f"s{number}.tif", scenes.random_rgb(height, width, seed=20 + number))
    scenes.two_bands(folder / "two.tif")
    (folder / "bad").mkdir()
    with scenes.one_thread():
        reports = _run_cases(_segmenter(folder / "text"), folder, "single", distributed.Dist())
    (folder / "reports-single.json").write_text(json.dumps(reports))
    return folder


def _bytes(path: Path) -> bytes:
    with rasterio.open(path) as src:
        return src.read().tobytes()


def test_two_ranks_write_the_one_process_outputs(folder: Path) -> None:
    spawn(worker, (2, str(folder)), 2, JOIN_TIMEOUT_S)
    reports = [json.loads((folder / f"reports-{rank}.json").read_text()) for rank in range(2)]
    single = json.loads((folder / "reports-single.json").read_text())
    for name, (_, count) in CASES.items():
        assert [r["input"] for r in reports[0][name]] == [r["input"] for r in reports[1][name]] \
            == [r["input"] for r in single[name]]  # every rank returns every scene's report, in input order
        for number in range(count):
            for suffix in (".tif", "_p.tif"):
                written = folder / f"{name}-world2" / f"s{number}{suffix}"
                assert _bytes(written) == _bytes(folder / f"{name}-single" / f"s{number}{suffix}"), (name, number)
            report = reports[0][name][number]
            assert [row["pixels"] for row in report["classes"]] == \
                [row["pixels"] for row in single[name][number]["classes"]]
    assert not any((folder / "work-world2").iterdir())  # every scene's store removed
    # a bad input on rank 1 stops both ranks before any work, rank 0 with one line naming rank 1
    assert reports[1]["error"][0] == "InputError" and "two.tif has 2 colour band" in reports[1]["error"][1]
    assert reports[0]["error"] == ["RankError", f"rank 1 stopped: {reports[1]['error'][1]}"]
    assert not any((folder / "bad").iterdir()) and not (folder / "work-bad").exists()
    # the collection and the per-scene mixtures differ: the test can tell them apart
    assert any(_bytes(folder / "scene3-single" / f"s{n}_p.tif") != _bytes(folder / "collection3-single" /
                                                                         f"s{n}_p.tif") for n in range(3))


def test_a_stopped_collection_resumes_to_the_same_bytes(folder: Path, tmp_path: Path) -> None:
    """A collection run that dies while encoding its second scene leaves every store; the rerun encodes only
    what is missing, solves again, and writes what an uninterrupted run writes."""
    import coninfer.pipeline as pipeline_module

    inputs = sorted((folder / "in").iterdir())
    options = dataclasses.replace(OPTIONS, context="collection")
    real = pipeline_module.embed_tiles
    calls = []

    def dies_in_the_second_scene(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # scene 0 is 3 batches of 2 tiles
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    with scenes.one_thread():
        segmenter = _segmenter(folder / "text")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline_module, "embed_tiles", dies_in_the_second_scene)
            with pytest.raises(RuntimeError, match="node lost"):
                segmenter.segment_files(inputs, tmp_path, options, workdir=tmp_path / "work", progress=False)
        assert not list(tmp_path.glob("*.tif"))  # nothing written before the mixture over all scenes
        reports = segmenter.segment_files(inputs, tmp_path, options, workdir=tmp_path / "work", progress=False)
    assert [report["tiles"]["resumed_from"] for report in reports] == [6, 2, 0]
    for number in range(3):
        assert _bytes(tmp_path / f"s{number}.tif") == _bytes(folder / "collection3-single" / f"s{number}.tif")


def test_scenes_go_whole_to_ranks_when_there_are_enough() -> None:
    def shares(count: int, world: int) -> list[tuple[bool, list[int]]]:
        return [(share.whole, share.mine) for share in
                (collection.share_scenes(count, distributed.Dist(rank, world, backend="gloo"))
                 for rank in range(world))]

    assert shares(3, 2) == [(True, [0]), (True, [1, 2])]
    assert shares(8, 8) == [(True, [rank]) for rank in range(8)]
    assert shares(3, 8) == [(False, [0, 1, 2])] * 8  # fewer scenes than ranks: every rank on every scene
    assert collection.share_scenes(5, distributed.Dist()).mine == [0, 1, 2, 3, 4]


def test_a_folder_is_its_rasters_sorted_by_name(tmp_path: Path) -> None:
    for name in ("b.TIF", "a.vrt", "c.jp2", "d.img", "e.tiff", "notes.txt", "f.png"):
        (tmp_path / name).write_text("")
    (tmp_path / "g.tif").mkdir()  # a folder, not a raster
    assert [p.name for p in collection.expand_inputs([tmp_path, "/vsicurl/https://x/y.tif"])[:5]] == [
        "a.vrt", "b.TIF", "c.jp2", "d.img", "e.tiff"]
    assert collection.expand_inputs("/vsicurl/https://x/y.tif") == ["/vsicurl/https://x/y.tif"]
    assert collection.input_stem("/vsicurl/https://x/y.tif?token=1") == "y"
    with pytest.raises(InputError, match="no input given"):
        collection.expand_inputs([])


def test_the_view_reads_and_writes_each_scenes_store(tmp_path: Path) -> None:
    parts = []
    for number, tiles in enumerate((3, 2)):
        folder = tmp_path / f"s{number}"
        folder.mkdir()
        with TileStore(folder, tiles, 4, 2) as store:
            store.put(list(range(tiles)), np.full((tiles, 4, 2), number, np.float32),
                      np.full((tiles, 4, 8), number, np.float32), np.ones((tiles, 4), np.uint8))
            store.record(encoded=list(range(tiles)))
        parts.append(collection.StorePart(folder, folder, tiles))
    view = collection.CollectionStore(parts, 4, 2, max_open=1)  # one store open at a time: reopened as needed
    try:
        assert view.shape == (5, 4) and view.features.shape == (5, 4, 8)
        assert view.locate([1, 2, 3, 4]) == [(0, [1, 2], slice(0, 2)), (1, [0, 1], slice(2, 4))]
        np.testing.assert_array_equal(view.logits[[2, 3]][:, 0, 0], [0, 1])
        view.z[[2, 3]] = np.stack([np.full((4, 2), 7.0), np.full((4, 2), 9.0)])
    finally:
        view.close()
    with TileStore(tmp_path / "s1", 2, 4, 2) as store:
        assert store.z[0][0, 0] == 9.0
    with TileStore(tmp_path / "s0", 3, 4, 2) as store:
        assert store.z[2][0, 0] == 7.0
