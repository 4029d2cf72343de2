"""Tests of coninfer.pipeline's building blocks: patch validity, tile readers, the scene grid, the memory store.

The passes themselves (encode_scene, solve_store, stitch_scene) are exercised end to end through the Segmenter in
tests/test_segmenter.py, against the in-memory solver."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from coninfer.errors import InputError
from coninfer.pipeline import ArrayScene, MemoryStore, OneBehind, array_reader, patch_validity, scene_grid
from coninfer.postprocess import labels_from_probabilities_np
from coninfer.raster.tiles import finalize_block
from coninfer.settings import SceneOptions


class TestPatchValidity:
    def test_a_patch_counts_when_at_least_half_of_its_pixels_are_valid(self) -> None:
        valid = np.zeros((4, 4), bool)  # 2 x 2 patches of 2 x 2 pixels
        valid[0, 0] = True  # patch 0: 1 of 4 valid
        valid[0, 2:] = True  # patch 1: 2 of 4 valid (exactly half)
        valid[2:, :2] = True  # patch 2: all valid
        np.testing.assert_array_equal(patch_validity(valid, 2), [0, 1, 1, 0])

    def test_uneven_pixels_per_patch(self) -> None:
        assert patch_validity(np.ones((5, 7), bool), 3).tolist() == [1] * 9


class TestArrayReader:
    def test_pads_past_the_edge_as_invalid_zeros(self) -> None:
        rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
        with array_reader(ArrayScene(rgb)) as read:
            pixels, valid = read(Window(4, 3, 4, 4))
        assert pixels.shape == (3, 4, 4) and valid.sum() == 4
        np.testing.assert_array_equal(pixels[:, :2, :2], np.moveaxis(rgb[3:5, 4:6], -1, 0))
        assert not pixels[:, 2:].any() and not pixels[:, :, 2:].any()

    def test_validity_mask_zeroes_pixels(self) -> None:
        rgb = np.full((4, 4, 3), 9, np.uint8)
        mask = np.ones((4, 4), bool)
        mask[0, 0] = False
        with array_reader(ArrayScene(rgb, mask)) as read:
            pixels, valid = read(Window(0, 0, 4, 4))
        assert not valid[0, 0] and not pixels[:, 0, 0].any() and pixels[:, 1, 1].tolist() == [9, 9, 9]

    @pytest.mark.parametrize("array", [np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4), np.uint8),
                                       np.zeros((4, 4, 3), np.float32)])
    def test_bad_arrays(self, array: np.ndarray) -> None:
        with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
            ArrayScene(array)


class TestSceneGrid:
    def test_a_tile_larger_than_the_scene_is_the_scene(self) -> None:
        grid = scene_grid(300, 200, SceneOptions(tile_size=100000, overlap=64))
        assert (grid.tile_size, len(grid)) == (300, 1) and grid.overlap == 64

    def test_ordinary_tiles_are_kept(self) -> None:
        grid = scene_grid(1000, 1000, SceneOptions())
        assert (grid.tile_size, grid.overlap, len(grid)) == (448, 0, 9)


class TestThresholdRule:
    """One prob_thd rule for the tile step (torch) and the stitched scene path (numpy): strictly below fires."""

    def test_equal_to_the_threshold_keeps_its_class(self) -> None:
        probs = np.array([[[0.25]], [[0.5]], [[0.25]]], np.float32)  # top probability exactly 0.5
        assert labels_from_probabilities_np(probs, 0.5, 0)[0, 0] == 1
        assert labels_from_probabilities_np(probs, 0.51, 0)[0, 0] == 0
        accumulated = np.concatenate([probs * 2, np.full((1, 1, 1), 2.0, np.float32)])  # weights sum 2
        assert finalize_block(accumulated, Window(0, 0, 1, 1), 0.5, 0).labels[0, 0] == 1
        assert finalize_block(accumulated, Window(0, 0, 1, 1), 0.51, 2).labels[0, 0] == 2


class TestMemoryStore:
    def test_records_and_commits(self) -> None:
        store = MemoryStore(3, 4, 2)
        store.put([2], np.ones((1, 4, 2), np.float32), np.ones((1, 4, 5), np.float32), np.ones((1, 4), np.uint8))
        assert store.missing_tiles() == [0, 1, 2]
        store.record(encoded=[2], empty=[0])
        store.record(solved={0: [2]})
        assert (store.missing_tiles(), store.empty_tiles(), store.solved_contexts()) == ([1], [0], {0: [2]})
        assert store.features.dtype == np.float16 and store.features[2].sum() == 20


class TestOneBehind:
    def test_calls_run_in_order_one_at_a_time(self) -> None:
        done: list[int] = []
        writer = OneBehind("test-writer")
        for number in range(5):
            writer.submit(done.append, number)
            assert done[:number] == list(range(number))  # submit waited for every call before this one
        writer.close()
        assert done == list(range(5))

    def test_an_error_is_raised_at_the_next_submit(self) -> None:
        def fail() -> None:
            raise OSError("disk full")

        writer = OneBehind("test-writer")
        writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            writer.submit(print)
        writer.close()

    def test_close_finishes_what_was_handed_over(self) -> None:
        done: list[str] = []
        writer = OneBehind("test-writer")
        with pytest.raises(KeyboardInterrupt):
            try:
                writer.submit(done.append, "batch")
                raise KeyboardInterrupt
            finally:
                writer.close()
        assert done == ["batch"]
