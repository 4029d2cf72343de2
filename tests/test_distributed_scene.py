"""The scene path under torch.distributed: 2 and 3 Gloo processes segment one scene into the class map one process
writes, byte for byte, for the scene context (one mixture fitted by all ranks over their shares of chunks) and the
batch context (whole contexts shared out); and a store left by an interrupted one-process run is finished by
several ranks, and a two-rank run whose rank 1 kills itself mid-encode is finished by one process. Each world
size is launched once (torch.multiprocessing spawn, TCP rendezvous on localhost); every join and collective has a
timeout, so a broken test fails, never hangs.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import rasterio
import torch
from tests import scenes
from tests.test_distributed import free_port, spawn
from torch.multiprocessing import ProcessExitedException

from coninfer import distributed
from coninfer.pipeline import STOP_AFTER_BATCHES_ENV
from coninfer.prompts import ClassList
from coninfer.segmenter import Segmenter
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.tile_step import load_models

CASES = {  # name -> scene options; chunks of 2 tiles, so the scene context's shares are real
    "scene": SceneOptions(tile_size=32, overlap=4, batch_size=2, solver_chunk_tiles=2),
    "batch": SceneOptions(tile_size=32, batch_size=2, context="batch", context_size=3),
}
SETTINGS = InferenceSettings().with_values(model_res=32)
JOIN_TIMEOUT_S = 240.0


def _segmenter(text_cache: Path) -> Segmenter:
    models = load_models(ClassList.parse(scenes.CLASSES), vlm="tiny-random", vfm="tiny-random", device="cpu",
                         precision="fp32", cache_dir=text_cache)
    return Segmenter(models, SETTINGS)


def _segment(segmenter: Segmenter, folder: Path, name: str, tag: str, **kwargs) -> dict:
    return segmenter.segment_file(folder / "scene.tif", folder / f"{name}-{tag}.tif", CASES[name],
                                  probabilities=folder / f"{name}-{tag}_p.tif", workdir=folder / f"work-{tag}",
                                  progress=False, **kwargs)


def worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the reference runs with one thread too: same float32 arithmetic
    out = Path(folder)
    distributed.setup("cpu", timeout=timedelta(seconds=90))
    try:
        segmenter = _segmenter(out / "text")
        reports = {name: _segment(segmenter, out, name, f"world{world}") for name in CASES}
        reports["resumed"] = _segment(segmenter, out, "scene", f"resume{world}")
        (out / f"reports-{rank}.json").write_text(json.dumps(reports))
    finally:
        distributed.teardown()


def killed_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank 1 kills itself (SIGKILL) after recording its first encode batch: the spawner then stops the others."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank == 1:
        os.environ[STOP_AFTER_BATCHES_ENV] = "1"
    torch.set_num_threads(1)
    distributed.setup("cpu", timeout=timedelta(seconds=90))
    try:
        _segment(_segmenter(Path(folder) / "text"), Path(folder), "scene", "killed")
    finally:
        distributed.teardown()


def _launch(world: int, folder: Path) -> list[dict]:
    spawn(worker, (world, free_port(), str(folder)), world, JOIN_TIMEOUT_S)
    return [json.loads((folder / f"reports-{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene, the one-process reference outputs, and an interrupted one-process store per world size."""
    import coninfer.pipeline as pipeline_module

    folder = tmp_path_factory.mktemp("dist-scene")
    scenes.rgb(folder / "scene.tif", scenes.random_rgb(100, 120, seed=7))
    with scenes.one_thread():
        segmenter = _segmenter(folder / "text")
        for name in CASES:
            _segment(segmenter, folder, name, "single")
        real = pipeline_module.embed_tiles
        for world in (2, 3):
            def dies_after_two_batches(*args, calls=[], **kwargs):  # noqa: B006 - one counter per world size
                calls.append(1)
                if len(calls) > 2:
                    raise RuntimeError("node lost")
                return real(*args, **kwargs)

            pipeline_module.embed_tiles = dies_after_two_batches
            try:
                with pytest.raises(RuntimeError, match="node lost"):
                    _segment(segmenter, folder, "scene", f"resume{world}")
            finally:
                pipeline_module.embed_tiles = real
    return folder


def _bytes(path: Path) -> bytes:
    with rasterio.open(path) as src:
        return src.read().tobytes()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_the_one_process_outputs(folder: Path, world: int) -> None:
    reports = _launch(world, folder)
    assert all(report == reports[0] for report in reports)  # every rank returns rank 0's report
    for name in CASES:
        for suffix in (".tif", "_p.tif"):
            assert _bytes(folder / f"{name}-world{world}{suffix}") == _bytes(folder / f"{name}-single{suffix}"), name
        assert (folder / f"{name}-world{world}.tif").read_bytes() == (folder / f"{name}-single.tif").read_bytes()
        assert not (folder / f"work-world{world}").exists() or not any((folder / f"work-world{world}").iterdir())
    resumed = reports[0]["resumed"]["tiles"]
    assert 0 < resumed["resumed_from"] < resumed["total"]  # two batches from the one-process run, the rest shared
    assert _bytes(folder / f"scene-resume{world}.tif") == _bytes(folder / "scene-single.tif")


def test_a_rank_killed_mid_encode_resumes_with_another_world_size(folder: Path) -> None:
    with pytest.raises(ProcessExitedException):
        spawn(killed_worker, (2, free_port(), str(folder)), 2, JOIN_TIMEOUT_S)
    assert not (folder / "scene-killed.tif").exists()
    with scenes.one_thread():
        report = _segment(_segmenter(folder / "text"), folder, "scene", "killed")  # world size 1 now
    tiles = report["tiles"]
    assert 0 < tiles["resumed_from"] < tiles["total"]  # the kill came mid-encode; what was recorded is kept
    assert _bytes(folder / "scene-killed.tif") == _bytes(folder / "scene-single.tif")
    assert _bytes(folder / "scene-killed_p.tif") == _bytes(folder / "scene-single_p.tif")
