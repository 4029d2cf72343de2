"""Encode once, query many: a rerun with other classes or solver settings reuses the stored embeddings, runs no
encoder, and writes exactly what a fresh run with those classes writes."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from tests import scenes

import coninfer.pipeline as pipeline_module
from coninfer.prompts import ClassList
from coninfer.segmenter import Segmenter
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.tile_step import load_models

TILE = 32
OPTIONS = SceneOptions(tile_size=TILE, overlap=4, batch_size=4)
SETTINGS = InferenceSettings().with_values(model_res=32)
OTHER_CLASSES = "water,river;building;grass,meadow,lawn;solar panel"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with scenes.one_thread():
        yield


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text-cache")


def _segmenter(classes: str, text_cache: Path, settings: InferenceSettings = SETTINGS) -> Segmenter:
    models = load_models(ClassList.parse(classes), vlm="tiny-random", vfm="tiny-random", device="cpu",
                         precision="fp32", cache_dir=text_cache)
    return Segmenter(models, settings)


def _pixels(path: Path) -> str:
    with rasterio.open(path) as src:
        return hashlib.sha256(src.read().tobytes()).hexdigest()


def _run(segmenter: Segmenter, source: Path, out: Path, work: Path, **kwargs) -> dict:
    return segmenter.segment_file(source, out, OPTIONS, workdir=work, probabilities=out.with_name(out.stem + "_p.tif"),
                                  progress=False, **kwargs)


def _no_encoder(*args, **kwargs):
    raise AssertionError("an encoder ran on a re-query")


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    return scenes.rgb(tmp_path / "scene.tif", scenes.random_rgb(70, 90, seed=5))


@pytest.mark.parametrize("change", ["classes", "temperature", "prob_thd"])
def test_a_requery_runs_no_encoder_and_equals_a_fresh_run(scene: Path, tmp_path: Path, text_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    first = _segmenter(scenes.CLASSES, text_cache)
    # its query store stays too: the re-query must not take the first run's priors or solution for its own
    _run(first, scene, tmp_path / "first.tif", tmp_path / "work", keep_workdir=True)
    classes, settings = scenes.CLASSES, SETTINGS
    if change == "classes":
        classes = OTHER_CLASSES
    else:
        settings = SETTINGS.with_values(**({"temperature": 7.0} if change == "temperature" else {"prob_thd": 0.4}))
    fresh = _run(_segmenter(classes, text_cache, settings), scene, tmp_path / "fresh.tif", tmp_path / "elsewhere")
    assert fresh["tiles"]["resumed_from"] == 0
    with monkeypatch.context() as patch:
        patch.setattr(pipeline_module, "embed_tiles", _no_encoder)
        report = _run(_segmenter(classes, text_cache, settings), scene, tmp_path / "requery.tif", tmp_path / "work",
                      keep_embeddings=True)
    assert report["tiles"]["resumed_from"] == report["tiles"]["total"] and report["tiles"]["tiles_per_s"] is None
    for suffix in (".tif", "_p.tif"):
        assert _pixels(tmp_path / f"requery{suffix}") == _pixels(tmp_path / f"fresh{suffix}")
    if change != "prob_thd":  # the re-query answers another question, not the first one again
        assert _pixels(tmp_path / "requery_p.tif") != _pixels(tmp_path / "first_p.tif")


def test_embeddings_go_with_the_run_unless_kept(scene: Path, tmp_path: Path, text_cache: Path) -> None:
    segmenter = _segmenter(scenes.CLASSES, text_cache)
    _run(segmenter, scene, tmp_path / "a.tif", tmp_path / "work")
    assert not any((tmp_path / "work").iterdir())
    _run(segmenter, scene, tmp_path / "b.tif", tmp_path / "work", keep_embeddings=True)
    [folder] = (tmp_path / "work").iterdir()
    names = {path.name for path in folder.iterdir()}
    assert {"clip.f32", "features.f16", "valid.u8", "embeddings.json"} <= names
    assert not any((folder / "queries").iterdir())  # the class-dependent part went with the run


def test_other_embedding_settings_encode_again(scene: Path, tmp_path: Path, text_cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What the embeddings depend on (here the CLIP variant) is part of their folder's key."""
    _run(_segmenter(scenes.CLASSES, text_cache), scene, tmp_path / "a.tif", tmp_path / "work", keep_embeddings=True)
    other = dataclasses.replace(SETTINGS, clip=dataclasses.replace(SETTINGS.clip, variant="maskclip"))
    assert other.clip != SETTINGS.clip
    report = _run(_segmenter(scenes.CLASSES, text_cache, other), scene, tmp_path / "b.tif", tmp_path / "work",
                  keep_embeddings=True)
    assert report["tiles"]["resumed_from"] == 0 and len(list((tmp_path / "work").iterdir())) == 2


def test_the_in_memory_path_matches_the_file_path_per_query_set(text_cache: Path) -> None:
    """segment_array computes priors from the CLIP tokens as the file path does."""
    segmenter = _segmenter(OTHER_CLASSES, text_cache)
    rgb = scenes.random_rgb(64, 64, seed=6)
    labels, probs = segmenter.segment_array(rgb, OPTIONS)
    again, probs_again = segmenter.segment_array(rgb, OPTIONS)
    np.testing.assert_array_equal(labels, again)
    assert probs.shape[0] == 4 and np.array_equal(probs, probs_again)
