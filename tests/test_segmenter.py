"""Tests of coninfer.segmenter (and the passes of coninfer.pipeline it composes): the Segmenter's store, contexts, stitching and outputs, with the tiny random models."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import rasterio.windows
import torch
from rasterio.errors import RasterioIOError

import scenes
from coninfer.errors import InputError, InputFileError, OutputError, ResourceError
from coninfer.pipeline import (
    ArrayScene,
    MemoryEmbeddings,
    MemoryStore,
    array_reader,
    encode_scene,
    file_reader,
    prior_scene,
    read_spooled,
    scene_grid,
    solve_store,
    spool_blocks,
    stitch_scene,
)
from coninfer.postprocess import class_probabilities, patches_to_grid
from coninfer.prompts import ClassList
from coninfer.raster import read
from coninfer.raster.tiles import BandStitcher
from coninfer.segmenter import Segmenter
from coninfer.settings import InferenceSettings, SceneOptions
from coninfer.solver import refine
from coninfer.store import EmbeddingStore, TileStore, locked_folder
from coninfer.tile_file import StoreCorruptError
from coninfer.tile_step import Models, embed_tiles, encode_tiles, load_models

TILE = 32
SETTINGS = InferenceSettings().with_values(model_res=32)  # 2 x 2 patches per tile


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with scenes.one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return load_models(ClassList.parse(scenes.CLASSES), vlm="tiny-random", vfm="tiny-random", device="cpu",
                       cache_dir=tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="module")
def segmenter(models: Models) -> Segmenter:
    return Segmenter(models, SETTINGS)


def _tiles_of(image: np.ndarray, tile: int) -> list[torch.Tensor]:
    """Row-major (3, tile, tile) tiles of an (H, W, 3) image whose sides are multiples of ``tile``."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    return [torch.from_numpy(np.moveaxis(image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile], -1, 0).copy())
            for r in range(rows) for c in range(cols)]  # fmt: skip


class TestSceneOptions:
    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"tile_size": 8}, "tile_size"), ({"overlap": 16}, "overlap"), ({"overlap": -1}, "overlap"),
        ({"context": "image"}, "context"), ({"context_size": 0}, "context_size"), ({"batch_size": 0}, "batch_size"),
        ({"solver_chunk_tiles": 0}, "solver_chunk_tiles"),
    ])  # fmt: skip
    def test_invalid_field_is_named(self, kwargs: dict, field: str) -> None:
        with pytest.raises(InputError, match=field.replace("_", "[_-]")):
            SceneOptions(**{"tile_size": 32, **kwargs})


class TestContexts:
    """Each context over the chunked on-disk store equals the in-memory solver on the same numbers."""

    ROWS, COLS, BATCH = 3, 4, 3

    @pytest.fixture(scope="class")
    @classmethod
    def image(cls) -> np.ndarray:
        return scenes.random_rgb(cls.ROWS * TILE, cls.COLS * TILE, seed=3)

    def _reference(self, models: Models, image: np.ndarray, contexts: list[list[int]] | None) -> np.ndarray:
        """Probabilities (C, H, W) from encode_tiles (same batches as the store) and refine() per context
        (None: the prior alone), features rounded to float16 like the store's."""
        tiles = _tiles_of(image, TILE)
        parts = [encode_tiles(models, tiles[i : i + self.BATCH], SETTINGS) for i in range(0, len(tiles), self.BATCH)]
        logits, features = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).half()
        z = torch.softmax(SETTINGS.solver.prior_scale * logits, dim=-1)  # (T, P, K)
        for context in contexts or []:
            num_queries = logits.shape[-1]
            z[context] = refine(logits[context].reshape(-1, num_queries),
                                features[context].reshape(-1, features.shape[-1])).reshape(len(context), -1, num_queries)
        probs = class_probabilities(patches_to_grid(z.reshape(-1, z.shape[-1]), 2, 2), (TILE, TILE),
                                    models.classes.query_to_class, SETTINGS.post.logit_scale)  # (T, C, tile, tile)
        classes = probs.shape[1]
        # (rows*cols, C, tile, tile) -> (rows, cols, C, tile, tile) -> (C, rows, tile, cols, tile) -> (C, H, W)
        grid = probs.reshape(self.ROWS, self.COLS, classes, TILE, TILE).permute(2, 0, 3, 1, 4)
        return grid.reshape(classes, self.ROWS * TILE, self.COLS * TILE).numpy()

    @pytest.mark.parametrize(("context", "context_size", "groups"), [
        ("scene", 50, [list(range(12))]), ("batch", 5, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]),
        ("none", 50, None),
    ])  # fmt: skip
    def test_equals_in_memory_solver(self, segmenter: Segmenter, models: Models, image: np.ndarray, context: str,
                                     context_size: int, groups: list[list[int]] | None) -> None:
        options = SceneOptions(tile_size=TILE, context=context, context_size=context_size, batch_size=self.BATCH,
                               solver_chunk_tiles=2)
        labels, probs = segmenter.segment_array(image, options)
        np.testing.assert_allclose(probs, self._reference(models, image, groups), atol=2e-5, rtol=0)
        np.testing.assert_array_equal(labels, probs.argmax(axis=0))

    def test_contexts_differ(self, segmenter: Segmenter, image: np.ndarray) -> None:
        """The checks above can fail: the scene fit moves the probabilities away from the prior."""
        results = [segmenter.segment_array(image, SceneOptions(tile_size=TILE, context=context))[1]
                   for context in ("scene", "none")]
        assert float(np.abs(results[0] - results[1]).max()) > 0.05

    def test_none_context_is_the_baseline(self, models: Models, image: np.ndarray) -> None:
        options = SceneOptions(tile_size=TILE, context="none")
        prior = Segmenter(models, SETTINGS).segment_array(image, options)
        baseline = Segmenter(models, InferenceSettings().with_values(model_res=32, method="baseline"))
        np.testing.assert_array_equal(baseline.segment_array(image, SceneOptions(tile_size=TILE))[1], prior[1])

    def test_a_sliver_context_keeps_the_prior(self, segmenter: Segmenter, caplog: pytest.LogCaptureFixture) -> None:
        """Tile 2 holds 2 valid columns, so no valid patch: alone in its batch context it cannot be fitted."""
        image = scenes.random_rgb(TILE, 2 * TILE + 2, seed=4)
        batch = segmenter.segment_array(image, SceneOptions(tile_size=TILE, context="batch", context_size=2))
        prior = segmenter.segment_array(image, SceneOptions(tile_size=TILE, context="none"))
        assert "keep the CLIP prior" in caplog.text
        np.testing.assert_array_equal(batch[1][:, :, 2 * TILE :], prior[1][:, :, 2 * TILE :])
        assert not np.array_equal(batch[1][:, :, : 2 * TILE], prior[1][:, :, : 2 * TILE])
        assert (batch[0] < 4).all()

    def test_scene_smaller_than_a_tile(self, segmenter: Segmenter) -> None:
        labels, probs = segmenter.segment_array(scenes.random_rgb(20, 27, seed=5), SceneOptions(tile_size=TILE))
        assert labels.shape == (20, 27) and probs.shape == (4, 20, 27)
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def _steps(probs: np.ndarray, axis: int) -> np.ndarray:
    """Largest change of any class probability between neighbouring pixels of (C, H, W) along ``axis`` (1: down
    the rows, 2: across the columns); entry x is the step from x to x + 1."""
    return np.abs(np.diff(probs, axis=axis)).max(axis=tuple({0, 1, 2} - {axis}))


class TestSeams:
    """Every tile of a constant image sees the same pixels, yet the probabilities vary with the position inside a
    tile (positional embeddings), so neighbouring tiles disagree where they meet."""

    def test_overlap_is_as_smooth_as_a_tile(self, segmenter: Segmenter) -> None:
        overlap, stride = 12, TILE - 12
        constant = np.full((2 * stride + overlap, 3 * stride + overlap, 3), 120, np.uint8)  # no padded tile
        _, probs = segmenter.segment_array(constant, SceneOptions(tile_size=TILE, overlap=overlap))
        for axis, starts in ((2, [stride, 2 * stride]), (1, [stride])):
            steps = _steps(probs, axis)
            band = np.zeros(steps.shape, bool)
            for start in starts:
                band[start - 1 : start + overlap] = True  # the steps into, across and out of an overlap
            assert steps[band].max() <= 2 * steps[~band].max()

    def test_without_overlap_tiles_leave_a_seam(self, segmenter: Segmenter) -> None:
        """The control: the check above would fail without blending."""
        _, probs = segmenter.segment_array(np.full((2 * TILE, 3 * TILE, 3), 120, np.uint8), SceneOptions(TILE))
        for axis, starts in ((2, [TILE, 2 * TILE]), (1, [TILE])):
            steps = _steps(probs, axis)
            border = [start - 1 for start in starts]
            assert steps[border].min() > 10 * np.delete(steps, border).max()


class TestStoreWrites:
    def test_features_come_as_the_stores_float16_bits(self, models: Models) -> None:
        """Cast where they are (torch), the features carry the bits numpy's cast of the float32 ones gives."""
        from coninfer.pipeline import encode_adaptive

        tiles = _tiles_of(scenes.random_rgb(TILE, 3 * TILE, seed=4), TILE)
        clip, features, _ = encode_adaptive(models, SETTINGS, tiles, 2)
        _, reference = embed_tiles(models, tiles, SETTINGS)
        assert features.dtype == np.float16 and clip.dtype == np.float32
        expected = reference.float().numpy().astype(np.float16)
        np.testing.assert_array_equal(features.view(np.uint16), expected.view(np.uint16))

    def test_a_batch_is_stored_while_the_next_is_encoded(self, models: Models, monkeypatch) -> None:
        """Storing batch 1 waits until batch 2 is being encoded: only a store in another thread lets the pass end.
        (The wait's timeout only bounds a failing run.)"""
        import threading

        from coninfer import pipeline

        image = scenes.random_rgb(TILE, 3 * TILE, seed=2)  # 3 tiles, batches of 1
        grid = scene_grid(image.shape[1], image.shape[0], SceneOptions(tile_size=TILE))
        embeddings = MemoryEmbeddings(len(grid), models.grid_size(SETTINGS.model_res) ** 2)
        encoding_second = threading.Event()
        encode, put, waited = pipeline.encode_adaptive, embeddings.put, []

        def counted(*args, **kwargs):
            encode_calls.append(1)
            if len(encode_calls) == 2:
                encoding_second.set()
            return encode(*args, **kwargs)

        def slow_put(indices, *args, **kwargs):
            if indices == [0]:
                waited.append(encoding_second.wait(timeout=30))
            return put(indices, *args, **kwargs)

        encode_calls: list[int] = []
        monkeypatch.setattr(pipeline, "encode_adaptive", counted)
        monkeypatch.setattr(embeddings, "put", slow_put)
        with array_reader(ArrayScene(image)) as read_tile:
            encode_scene(models, SETTINGS, read_tile, grid, embeddings, batch_size=1)
        assert waited == [True] and embeddings.missing_tiles() == []


class TestProbabilitiesOnlyWhenAsked:
    @pytest.mark.parametrize(("outputs", "expected"), [({}, False), ({"vector": "v.gpkg", "preview": "p.png"}, False),
                                                       ({"probabilities": "p.tif"}, True),
                                                       ({"confidence": "c.tif"}, True)])
    def test_the_stitch_brings_probabilities_for_the_outputs_that_read_them(
            self, segmenter: Segmenter, tmp_path: Path, monkeypatch, outputs: dict, expected: bool) -> None:
        from coninfer import segmenter as segmenter_module

        asked = []

        def spy(*args, **kwargs):
            asked.append(kwargs.get("probabilities", True))
            yield from stitch_scene(*args, **kwargs)

        monkeypatch.setattr(segmenter_module, "stitch_scene", spy)
        path = scenes.rgb(tmp_path / "in.tif", scenes.random_rgb(2 * TILE, TILE + 5, seed=1))
        segmenter.segment_file(path, tmp_path / "out.tif", SceneOptions(tile_size=TILE), progress=False,
                               workdir=tmp_path / "work", **{name: tmp_path / value for name, value in outputs.items()})
        assert asked == [expected]


class TestStitchValidity:
    """The stitch pass takes a maskless file's validity from the windows (no second read of the file), with the
    same blocks as when it reads every tile again."""

    @staticmethod
    def _blocks(models: Models, path: Path, *, nodata: float | None = None) -> tuple[list[tuple], int, bool]:
        scene = read.open_scene(path, nodata=nodata)
        grid = scene_grid(scene.width, scene.height, SceneOptions(tile_size=TILE, overlap=6))
        patches = models.grid_size(SETTINGS.model_res) ** 2
        store = MemoryStore(len(grid), patches, len(models.classes.queries))
        with file_reader(scene) as read_tile:
            encode_scene(models, SETTINGS, read_tile, grid, store.embeddings, batch_size=4)
            prior_scene(models, SETTINGS, read_tile, grid, store, batch_size=4)
            solve_store(store, SETTINGS, SceneOptions(tile_size=TILE, overlap=6), device=models.device)
            reads = []

            def counted(window):
                reads.append(window)
                return read_tile(window)

            def plain(window):  # a reader without ``validity``: every tile is read again
                return read_tile(window)

            if hasattr(read_tile, "validity"):
                counted.validity = read_tile.validity
            blocks = TestBandStitch._flat(stitch_scene(models, SETTINGS, counted, grid, store))
            assert blocks == TestBandStitch._flat(stitch_scene(models, SETTINGS, plain, grid, store))
        return blocks, len(reads), hasattr(read_tile, "validity")

    def test_a_maskless_file_is_not_read_again(self, models: Models, tmp_path: Path) -> None:
        image = scenes.random_rgb(3 * TILE - 7, 2 * TILE + 5, seed=3)  # edge tiles padded: False past the edge
        blocks, reads, cheap = self._blocks(models, scenes.rgb(tmp_path / "a.tif", image))
        assert cheap and reads == 0 and blocks

    def test_a_file_with_nodata_is(self, models: Models, tmp_path: Path) -> None:
        image = scenes.random_rgb(3 * TILE - 7, 2 * TILE + 5, seed=3)
        image[5:40, 3:20] = 0
        _, reads, cheap = self._blocks(models, scenes.rgb(tmp_path / "a.tif", image), nodata=0)
        assert not cheap and reads > 0


class TestBandStitch:
    """Ranks stitch disjoint bands of tile rows; the bands' blocks, in order, are the whole pass's bit for bit."""

    @staticmethod
    def _solved(models: Models, image: np.ndarray, valid: np.ndarray, options: SceneOptions):
        scene = ArrayScene(image, valid)
        grid = scene_grid(scene.width, scene.height, options)
        patches = models.grid_size(SETTINGS.model_res) ** 2
        embeddings = MemoryEmbeddings(len(grid), patches)
        store = MemoryStore(len(grid), patches, len(models.classes.queries), embeddings)
        reader = array_reader(scene)
        read_tile = reader.__enter__()
        encode_scene(models, SETTINGS, read_tile, grid, embeddings, batch_size=4)
        prior_scene(models, SETTINGS, read_tile, grid, store, batch_size=4)
        solve_store(store, SETTINGS, options, device=models.device)
        return grid, store, read_tile

    @staticmethod
    def _flat(blocks) -> list[tuple]:
        return [(tuple(b.window.flatten()), b.labels.tobytes(), b.probs.tobytes(), b.valid.tobytes()) for b in blocks]

    @pytest.mark.parametrize("overlap", [0, 10])
    def test_bands_equal_the_whole_pass(self, models: Models, overlap: int, tmp_path: Path) -> None:
        image = scenes.random_rgb(5 * TILE - 20, 2 * TILE + 7, seed=6)
        valid = np.ones(image.shape[:2], bool)
        valid[40:70, 5:50] = False  # a hole: varying weights across a band edge
        valid[: TILE + 5] = False  # the first tile row entirely empty (no tile added)
        grid, store, read_tile = self._solved(models, image, valid, SceneOptions(tile_size=TILE, overlap=overlap))
        assert grid.n_rows >= 5 and store.empty_tiles()
        whole = self._flat(stitch_scene(models, SETTINGS, read_tile, grid, store))
        for cuts in ([0, 2, grid.n_rows], [0, 1, 3, 3, grid.n_rows], [0, 0, grid.n_rows - 1, grid.n_rows]):
            bands = [range(start, stop) for start, stop in zip(cuts, cuts[1:], strict=False)]
            parts = [self._flat(stitch_scene(models, SETTINGS, read_tile, grid, store, rows=band)) for band in bands]
            assert [block for part in parts for block in part] == whole, cuts
            # the same through the spools rank 0 reads back
            paths = [tmp_path / f"rank{rank}.bin" for rank in range(len(bands))]
            for band, path in zip(bands, paths, strict=True):
                spool_blocks(stitch_scene(models, SETTINGS, read_tile, grid, store, rows=band), path)
            assert self._flat(read_spooled(paths, len(models.classes.names))) == whole

    @pytest.mark.parametrize("overlap", [0, 10])
    def test_a_band_on_the_models_device_gives_the_same_blocks(self, models: Models, overlap: int) -> None:
        """``band_device``: the band a CUDA run keeps on the GPU, forced onto the CPU here (torch, not numpy)."""
        image = scenes.random_rgb(3 * TILE - 20, 2 * TILE + 7, seed=6)
        valid = np.ones(image.shape[:2], bool)
        valid[40:70, 5:50] = False
        grid, store, read_tile = self._solved(models, image, valid, SceneOptions(tile_size=TILE, overlap=overlap))
        whole = self._flat(stitch_scene(models, SETTINGS, read_tile, grid, store))
        assert self._flat(stitch_scene(models, SETTINGS, read_tile, grid, store, band_device=torch.device("cpu"))
                          ) == whole
        for band_device in ("auto", torch.device("cpu")):
            blocks = list(stitch_scene(models, SETTINGS, read_tile, grid, store, probabilities=False,
                                       band_device=band_device))
            assert [b.probs for b in blocks] == [None] * len(whole)
            assert [(b.labels.tobytes(), b.valid.tobytes()) for b in blocks] == [(w[1], w[3]) for w in whole]

    def test_without_the_warm_up_row_the_band_edge_differs(self, models: Models) -> None:
        """The control: a band that skipped the row before would miss the overlap's other half."""
        image = scenes.random_rgb(3 * TILE, 2 * TILE, seed=6)
        grid, store, read_tile = self._solved(models, image, np.ones(image.shape[:2], bool),
                                              SceneOptions(tile_size=TILE, overlap=10))
        whole = self._flat(stitch_scene(models, SETTINGS, read_tile, grid, store))
        stitcher = BandStitcher(grid, len(models.classes.names), first_row=1)
        cold = []
        for index in range(grid.n_cols, len(grid)):
            probs = class_probabilities(patches_to_grid(torch.from_numpy(store.z[index]), 2, 2), (TILE, TILE),
                                        models.classes.query_to_class, SETTINGS.post.logit_scale)[0].numpy()
            cold += self._flat(stitcher.add(index, probs))
        first = len(whole) - len(cold)
        assert cold[0][0] == whole[first][0] and cold[0][2] != whole[first][2]

    def test_damaged_spool_names_the_work_folder(self, models: Models, tmp_path: Path) -> None:
        image = scenes.random_rgb(2 * TILE, TILE, seed=6)
        grid, store, read_tile = self._solved(models, image, np.ones(image.shape[:2], bool), SceneOptions(TILE))
        path = tmp_path / "rank0.bin"
        assert spool_blocks(stitch_scene(models, SETTINGS, read_tile, grid, store), path) == 2
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(StoreCorruptError, match="stitch spool rank0.bin is shorter"):
            list(read_spooled([path], len(models.classes.names)))
        (tmp_path / "rank0.bin.json").unlink()
        with pytest.raises(StoreCorruptError, match="rank0.bin.json is missing"):
            list(read_spooled([path], len(models.classes.names)))


class TestSegmentArray:
    def test_labels_and_probabilities(self, segmenter: Segmenter) -> None:
        labels, probs = segmenter.segment_array(scenes.random_rgb(40, 70), SceneOptions(tile_size=TILE, overlap=4))
        assert labels.shape == (40, 70) and labels.dtype == np.uint8
        assert probs.shape == (4, 40, 70) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)  # one query per class: a softmax
        np.testing.assert_array_equal(labels, probs.argmax(axis=0))

    def test_same_as_the_file(self, segmenter: Segmenter, tmp_path: Path) -> None:
        pixels = scenes.random_rgb(40, 70, seed=1)
        options = SceneOptions(tile_size=TILE, overlap=4)
        labels, _ = segmenter.segment_array(pixels, options)
        segmenter.segment_file(scenes.rgb(tmp_path / "a.tif", pixels), tmp_path / "out.tif", options,
                               workdir=tmp_path / "work", progress=False)
        with rasterio.open(tmp_path / "out.tif") as src:
            np.testing.assert_array_equal(src.read(1), labels)

    def test_torch_input_and_validity_mask(self, segmenter: Segmenter) -> None:
        pixels = scenes.random_rgb(40, 70, seed=2)
        options = SceneOptions(tile_size=TILE)
        labels, probs = segmenter.segment_array(pixels, options)
        from_torch = segmenter.segment_array(torch.from_numpy(pixels), options)
        np.testing.assert_array_equal(from_torch[0], labels)
        np.testing.assert_array_equal(from_torch[1], probs)
        valid = np.ones(pixels.shape[:2], bool)
        valid[:, :TILE] = False  # a nodata strip: its tiles are empty and its pixels nodata
        masked, _ = segmenter.segment_array(pixels, options, valid=valid)
        assert (masked[:, :TILE] == 255).all() and (masked[:, TILE:] < 255).all()

    def test_empty_array_is_one_clear_error(self, segmenter: Segmenter) -> None:
        with pytest.raises(InputError, match="empty"):
            segmenter.segment_array(np.zeros((0, 0, 3), np.uint8))

    @pytest.mark.parametrize("array", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                       np.zeros((8, 8, 3), np.float32)])
    def test_bad_array(self, segmenter: Segmenter, array: np.ndarray) -> None:
        with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
            segmenter.segment_array(array)


class TestOutOfMemory:
    """CUDA out-of-memory halves the encoder batch and the run goes on; at one tile it is a clear error."""

    def test_batch_is_halved_and_results_unchanged(self, segmenter, monkeypatch, caplog) -> None:
        import coninfer.pipeline as scene_module

        pixels = scenes.random_rgb(64, 96, seed=3)
        options = SceneOptions(tile_size=TILE, batch_size=4)
        expected, _ = segmenter.segment_array(pixels, options)
        real, sizes = scene_module.embed_tiles, []

        def small_gpu(models, tiles, settings):
            sizes.append(len(tiles))
            if len(tiles) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(models, tiles, settings)

        monkeypatch.setattr(scene_module, "embed_tiles", small_gpu)
        with caplog.at_level("WARNING"):
            labels, _ = segmenter.segment_array(pixels, options)
        np.testing.assert_array_equal(labels, expected)
        assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}  # halved twice, then kept at 1
        assert "continuing with --batch-size 1" in caplog.text

    def test_one_tile_too_big_is_a_clear_error(self, segmenter, monkeypatch) -> None:
        import coninfer.pipeline as scene_module

        def no_gpu_memory(models, tiles, settings):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(scene_module, "embed_tiles", no_gpu_memory)
        with pytest.raises(ResourceError, match="out of memory even for one tile"):
            segmenter.segment_array(scenes.random_rgb(32, 32), SceneOptions(tile_size=TILE, batch_size=2))

    def test_array_too_large_for_the_host_is_refused_before_work(self, segmenter, monkeypatch) -> None:
        """segment_array holds the whole scene: the estimate counts it and the error points to files."""
        from coninfer import memory

        pixels = scenes.random_rgb(64, 96, seed=3)
        needed = memory.estimate_run_memory(memory.run_shape(
            segmenter.models, SETTINGS, scene_grid(96, 64, SceneOptions(tile_size=TILE)), SceneOptions(tile_size=TILE),
            in_memory=True)).host_bytes
        monkeypatch.setattr(memory, "available_host_memory", lambda: int(needed * memory.HEADROOM) // 2)
        monkeypatch.setattr("coninfer.segmenter.encode_scene", None)  # encoding would be a failure of the check
        with pytest.raises(ResourceError, match="of host memory"):
            segmenter.segment_array(pixels, SceneOptions(tile_size=TILE))


class TestSegmentFile:
    OPTIONS = SceneOptions(tile_size=TILE, overlap=4, batch_size=4)

    def test_report_and_workdir(self, segmenter: Segmenter, tmp_path: Path) -> None:
        source = scenes.multispectral(tmp_path / "ms.tif")
        report = segmenter.segment_file(source, tmp_path / "classes.tif", self.OPTIONS, bands=(3, 2, 1),
                                        workdir=tmp_path / "work", keep_workdir=True, progress=False)
        assert json.loads((tmp_path / "classes.json").read_text()) == report  # default report path
        assert report["settings"]["bands"] == [3, 2, 1]
        assert report["tiles"] == {"total": 6, "empty": 0, "encoded": 6, "resumed_from": 0,
                                   "tiles_per_s": report["tiles"]["tiles_per_s"]}
        [folder] = (tmp_path / "work").iterdir()
        [queries] = (folder / "queries").iterdir()  # the class-dependent store inside the embeddings folder
        embeddings = EmbeddingStore(folder, 6, 4)
        store = TileStore(queries, 6, 4, len(segmenter.models.classes.queries), embeddings=embeddings)
        assert store.missing_tiles() == [] and store.state["solved"] and embeddings.missing_tiles() == []

    def test_empty_tiles_are_skipped(self, segmenter: Segmenter, tmp_path: Path) -> None:
        """Tiles in the nodata columns are never encoded and stay nodata in the class map."""
        source = scenes.multispectral(tmp_path / "ms.tif", width=80, height=40)
        with rasterio.open(source, "r+") as dst:  # nodata over the first 40 columns: tile 0 of each row is empty
            dst.write(np.zeros((5, 40, 40), np.uint16), window=((0, 40), (0, 40)))
        report = segmenter.segment_file(source, tmp_path / "out.tif", SceneOptions(tile_size=TILE), progress=False,
                                        workdir=tmp_path / "work")
        assert report["tiles"]["empty"] == 2 and report["tiles"]["encoded"] == 4
        with rasterio.open(tmp_path / "out.tif") as src:
            labels = src.read(1)
        assert (labels[:, :40] == 255).all() and (labels[:, 40:] < 4).all()

    def test_outputs_are_checked_first(self, segmenter: Segmenter, tmp_path: Path) -> None:
        source = scenes.multispectral(tmp_path / "ms.tif")
        with pytest.raises(InputError, match="two outputs share one path"):
            segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, probabilities=tmp_path / "out.tif")
        with pytest.raises(InputError, match="--vector .*v.shp: '.shp' is not a vector file name"):
            segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, vector=tmp_path / "v.shp")
        assert scenes.files_in(tmp_path) == {"ms.tif"}

    def test_entirely_nodata(self, segmenter: Segmenter, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="entirely nodata"):
            segmenter.segment_file(scenes.all_nodata(tmp_path / "n.tif"), tmp_path / "out.tif", self.OPTIONS,
                                   workdir=tmp_path / "work")
        assert scenes.files_in(tmp_path) == {"n.tif"}

    def test_unwritable_workdir(self, segmenter: Segmenter, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(OutputError, match="cannot create the work folder") as error:
            segmenter.segment_file(scenes.multispectral(tmp_path / "ms.tif"), tmp_path / "out.tif", self.OPTIONS,
                                   workdir=tmp_path / "file" / "work")
        assert "--workdir" in error.value.hint

    def test_read_error_mid_run_leaves_no_output(self, segmenter: Segmenter, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """A block GDAL cannot decode (a damaged file) while stitching: one-line error, no partial class map."""
        source = scenes.multispectral(tmp_path / "ms.tif")
        calls = []
        original = read.read_window

        def failing(scene, window, *, src=None):
            calls.append(window)
            if len(calls) > 8:  # 6 reads to encode, then the stitch pass
                raise RasterioIOError("TIFFReadEncodedTile() failed")
            return original(scene, window, src=src)

        monkeypatch.setattr(read, "read_window", failing)
        with pytest.raises(InputFileError, match=r"cannot read .*ms.tif at pixel window .*TIFFReadEncodedTile"):
            segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, probabilities=tmp_path / "p.tif",
                                   workdir=tmp_path / "work")
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ms.tif"]  # no output, no .part file


class TestGeographicScene:
    def test_report_areas_in_square_metres(self, segmenter: Segmenter, tmp_path: Path) -> None:
        """EPSG:4326: areas on the ellipsoid in m², like the vectors', not in degrees² (which print as 0.0)."""
        source = tmp_path / "geo.tif"
        transform = rasterio.Affine(1e-4, 0.0, 6.9, 0.0, -1e-4, 50.95)
        with rasterio.open(source, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                           crs="EPSG:4326", transform=transform) as dst:
            dst.write(np.moveaxis(scenes.random_rgb(30, 40, seed=2), -1, 0))
        report = segmenter.segment_file(source, tmp_path / "out.tif", SceneOptions(tile_size=TILE), progress=False,
                                        vector=tmp_path / "out.geojson", workdir=tmp_path / "work")
        georef = read.open_scene(source).georef
        total = float(np.broadcast_to(georef.pixel_areas(rasterio.windows.Window(0, 0, 40, 30)), (30, 40)).sum())
        assert {row["area_unit"] for row in report["classes"]} == {"m2"}
        assert sum(row["area"] for row in report["classes"]) == pytest.approx(total, rel=1e-9)
        assert total == pytest.approx(1200 * 7.01 * 11.12, rel=5e-3)
        with fiona.open(tmp_path / "out.geojson") as layer:
            vector_areas = {f.properties["class_id"]: f.properties["area"] for f in layer}
        assert vector_areas == pytest.approx({row["class_id"]: row["area"] for row in report["classes"]
                                              if row["pixels"]}, rel=1e-9)


class TestWorkdir:
    OPTIONS = SceneOptions(tile_size=TILE, batch_size=4)

    def test_key_follows_settings_and_content(self, segmenter: Segmenter, tmp_path: Path) -> None:
        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(40, 50, seed=1))
        key = segmenter._workdir(read.open_scene(source), self.OPTIONS, tmp_path)
        assert segmenter._workdir(read.open_scene(source), self.OPTIONS, tmp_path) == key
        overlap = SceneOptions(tile_size=TILE, batch_size=4, overlap=4)
        assert segmenter._workdir(read.open_scene(source), overlap, tmp_path) != key
        # rewritten in place with other pixels, same size and modification time (cp -p, rsync -t, tar x)
        stat = source.stat()
        scenes.rgb(tmp_path / "b.tif", scenes.random_rgb(40, 50, seed=2)).replace(source)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert source.stat().st_size == stat.st_size and source.stat().st_mtime_ns == stat.st_mtime_ns
        assert segmenter._workdir(read.open_scene(source), self.OPTIONS, tmp_path) != key

    def test_a_second_run_on_the_same_store_is_refused(self, segmenter: Segmenter, tmp_path: Path) -> None:
        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(40, 50, seed=1))
        folder = segmenter._workdir(read.open_scene(source), self.OPTIONS, tmp_path / "work")
        with locked_folder(folder), pytest.raises(OutputError, match="another run is using the work folder"):
            segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, workdir=tmp_path / "work",
                                   progress=False)
        assert scenes.files_in(tmp_path) == {"a.tif"}
        segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, workdir=tmp_path / "work", progress=False)
        assert not folder.exists()  # the lock was released, the finished store removed

    def test_failure_after_the_class_map_leaves_no_output_and_resumes(self, segmenter: Segmenter, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """Outputs appear together at the end, so rerunning the same call after a late failure needs no
        --overwrite, and it resumes from the finished store."""
        import coninfer.outputs as outputs_module

        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(40, 50, seed=1))
        kwargs = {"vector": tmp_path / "v.gpkg", "preview": tmp_path / "p.png", "workdir": tmp_path / "work",
                  "progress": False}

        def broken_preview(*args, **kw):
            raise OSError("disk full (simulated)")

        with monkeypatch.context() as patch:
            patch.setattr(outputs_module.write, "write_preview", broken_preview)
            with pytest.raises(OSError, match="simulated"):
                segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, **kwargs)
        assert {name for name in scenes.files_in(tmp_path) if not name.startswith("work")} == {"a.tif"}
        report = segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, **kwargs)
        assert report["tiles"]["resumed_from"] == report["tiles"]["total"]
        assert {"out.tif", "out.json", "v.gpkg", "p.png"} <= scenes.files_in(tmp_path)
        assert fiona.listlayers(tmp_path / "v.gpkg") == ["v"]  # named after the file, not its temporary

    def test_full_disk_while_storing_is_a_clear_error(self, segmenter: Segmenter, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwrite", no_space)
        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(40, 50, seed=1))
        with pytest.raises(OutputError, match="cannot write the work store .*No space left on device") as error:
            segmenter.segment_file(source, tmp_path / "out.tif", self.OPTIONS, workdir=tmp_path / "work",
                                   progress=False)
        assert "--workdir" in error.value.hint


class TestSegmenterChecks:
    def test_background_class_out_of_range(self, models: Models) -> None:
        with pytest.raises(InputError, match="--bg-index 4 is not a class index"):
            Segmenter(models, InferenceSettings().with_values(model_res=32, prob_thd=0.5, bg_index=4))

    def test_too_many_classes(self) -> None:
        names = ";".join(f"class {i}" for i in range(256))
        with pytest.raises(InputError, match="256 classes, at most 255"):
            Segmenter.from_presets(names, vlm="no-such-model", vfm="no-such-model")  # checked before any model is loaded


class TestPackage:
    def test_segmenter_at_top_level_and_solver_alone_stays_light(self) -> None:
        code = ("import sys; from coninfer import refine; "
                "assert 'rasterio' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
                "import coninfer; from coninfer.segmenter import Segmenter; assert coninfer.Segmenter is Segmenter")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr


def test_gdal_cache_inside_a_run_is_256_mib_in_bytes(segmenter: Segmenter, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this pins: ``rasterio.Env(GDAL_CACHEMAX=256)`` is 256 *bytes*; every read of a run ran under it."""
    import coninfer.segmenter as segmenter_module

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen = []
    real = segmenter_module.encode_scene

    def spy(*args, **kwargs):
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter_module, "encode_scene", spy)
    source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(40, 50, seed=1))
    segmenter.segment_file(source, tmp_path / "out.tif", SceneOptions(tile_size=TILE), workdir=tmp_path / "work",
                           progress=False)
    assert seen == [256 * 2**20]


class TestDamage:
    """Nothing damaged reaches the outputs: bad store records are re-encoded, a bad state file stops the run,
    and a full disk while writing is one line with the old outputs untouched."""

    OPTIONS = SceneOptions(tile_size=TILE, batch_size=2)

    def _run(self, segmenter: Segmenter, source: Path, out: Path, work: Path, **kwargs) -> dict:
        return segmenter.segment_file(source, out, self.OPTIONS, workdir=work, keep_workdir=True, progress=False,
                                      overwrite=True, **kwargs)

    def test_damaged_records_are_encoded_again(self, segmenter: Segmenter, tmp_path: Path, caplog) -> None:
        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(64, 64, seed=4))
        self._run(segmenter, source, tmp_path / "fresh.tif", tmp_path / "work")
        [folder] = (tmp_path / "work").iterdir()
        [queries] = (folder / "queries").iterdir()
        for path in (queries / "logits.f32", queries / "z.f32", folder / "features.f16", folder / "clip.f32"):
            # random bytes over the first tiles' priors, solver output, features and CLIP tokens
            with open(path, "r+b") as handle:
                handle.write(np.random.default_rng(0).bytes(256))
        with caplog.at_level("WARNING"):
            report = self._run(segmenter, source, tmp_path / "again.tif", tmp_path / "work")
        assert "damaged tile" in caplog.text and report["tiles"]["resumed_from"] < report["tiles"]["total"]
        with rasterio.open(tmp_path / "fresh.tif") as a, rasterio.open(tmp_path / "again.tif") as b:
            np.testing.assert_array_equal(a.read(), b.read())

    @pytest.mark.parametrize("name", ["embeddings.json", "queries/*/state.json"])
    def test_corrupt_state_file_is_one_line_naming_no_resume(self, segmenter: Segmenter, tmp_path: Path,
                                                             name: str) -> None:
        from coninfer.store import StoreCorruptError

        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(64, 64, seed=4))
        self._run(segmenter, source, tmp_path / "out.tif", tmp_path / "work")
        [folder] = (tmp_path / "work").iterdir()
        [state] = folder.glob(name)
        state.write_text("{not json")
        with pytest.raises(StoreCorruptError, match=state.name) as error:
            self._run(segmenter, source, tmp_path / "out2.tif", tmp_path / "work")
        assert "--no-resume" in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "out2.tif").exists()
        self._run(segmenter, source, tmp_path / "out2.tif", tmp_path / "work", resume=False)
        assert (tmp_path / "out2.tif").exists()

    def test_full_disk_while_writing_outputs(self, segmenter: Segmenter, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        from rasterio.errors import RasterioIOError

        from coninfer.raster import write

        source = scenes.rgb(tmp_path / "a.tif", scenes.random_rgb(64, 64, seed=4))
        (tmp_path / "out.tif").write_bytes(b"old")

        def full(*args, **kwargs):
            raise RasterioIOError("Free disk space available is 0 bytes, whereas 65536 are at least necessary")

        monkeypatch.setattr(write.ClassMapWriter, "write", full)
        with pytest.raises(OutputError, match="cannot write the outputs in") as error:
            self._run(segmenter, source, tmp_path / "out.tif", tmp_path / "work")
        assert "\n" not in str(error.value) and (tmp_path / "out.tif").read_bytes() == b"old"
        assert not [p for p in tmp_path.iterdir() if ".coninfer-" in p.name]
