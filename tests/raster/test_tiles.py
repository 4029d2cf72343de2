"""Tests of coninfer.raster.tiles: grid arithmetic, blend weights and the band-wise stitcher."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from coninfer.raster import (
    NODATA_LABEL,
    BandStitcher,
    StitchedBlock,
    TileGrid,
    blend_weights,
    block_windows,
)
from coninfer.raster import tiles as tiles_module


class TestTileGrid:
    @pytest.mark.parametrize(
        ("width", "height", "tile", "overlap", "cols", "rows"),
        [(100, 100, 100, 0, 1, 1), (101, 40, 50, 10, 3, 1), (75, 53, 32, 8, 3, 2), (10, 7, 32, 8, 1, 1)],
    )
    def test_counts(self, width: int, height: int, tile: int, overlap: int, cols: int, rows: int) -> None:
        grid = TileGrid(width, height, tile, overlap)
        assert (grid.n_cols, grid.n_rows, len(grid)) == (cols, rows, cols * rows)
        assert grid.stride == tile - overlap

    @pytest.mark.parametrize(("width", "height", "tile", "overlap"), [(75, 53, 32, 8), (101, 40, 50, 0)])
    def test_every_pixel_covered_and_edges(self, width: int, height: int, tile: int, overlap: int) -> None:
        grid = TileGrid(width, height, tile, overlap)
        coverage = np.zeros((height + tile, width + tile), int)
        for window in grid.windows():
            assert (window.width, window.height) == (tile, tile)  # edge tiles keep their size
            coverage[window.toslices()] += 1
        assert (coverage[:height, :width] >= 1).all()
        last = grid.window(len(grid) - 1)
        assert last.col_off < width <= last.col_off + tile and last.row_off < height <= last.row_off + tile

    def test_row_major_index(self) -> None:
        grid = TileGrid(75, 53, 32, 8)
        assert grid.window(0) == Window(0, 0, 32, 32)
        assert grid.window(1) == Window(24, 0, 32, 32)
        assert grid.window(3) == Window(0, 24, 32, 32)
        assert list(grid) == grid.windows()
        with pytest.raises(IndexError, match="tile index 6 out of range"):
            grid.window(6)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"width": 0}, "width must be >= 1"),
            ({"tile_size": 0}, "tile_size must be >= 1"),
            ({"overlap": 16}, "overlap must be >= 0 and < tile_size / 2"),
            ({"overlap": -1}, "overlap must be >= 0"),
        ],
    )
    def test_validation(self, kwargs: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            TileGrid(**{"width": 50, "height": 50, "tile_size": 32, "overlap": 8, **kwargs})

    def test_block_windows_partition(self) -> None:
        coverage = np.zeros((53, 75), int)
        for window in block_windows(75, 53, 20):
            coverage[window.toslices()] += 1
        assert (coverage == 1).all()


class TestBlendWeights:
    def test_shape_positive_and_symmetric(self) -> None:
        weights = blend_weights(32, 8)
        assert weights.shape == (32, 32) and weights.dtype == np.float32
        assert weights.min() == pytest.approx((0.5 / 8) ** 2) and weights.max() == 1.0
        np.testing.assert_array_equal(weights, weights.T)
        np.testing.assert_array_equal(weights, weights[::-1, ::-1])

    def test_no_overlap_is_uniform(self) -> None:
        assert (blend_weights(16, 0) == 1).all()

    def test_partition_of_unity_inside(self) -> None:
        grid = TileGrid(80, 80, 32, 8)
        total = np.zeros((80 + 32, 80 + 32))
        for window in grid:
            total[window.toslices()] += blend_weights(32, 8)
        # away from the raster border every pixel's weights sum to exactly 1
        np.testing.assert_allclose(total[8:72, 8:72], 1.0, atol=1e-6)


Blocks = list[StitchedBlock]


def _tiles_of(grid: TileGrid, field: np.ndarray, valid: np.ndarray | None = None):
    """Yield (probs, valid) of every tile cut from a (C, H, W) field, zero-padded and invalid past the edge
    (``valid`` None: every tile valid everywhere)."""
    channels, height, width = field.shape
    padded = np.zeros((channels, height + grid.tile_size, width + grid.tile_size), np.float32)
    padded[:, :height, :width] = field
    padded_valid = np.zeros(padded.shape[1:], bool)
    padded_valid[:height, :width] = True if valid is None else valid
    for window in grid:
        yield padded[(slice(None), *window.toslices())], None if valid is None else padded_valid[window.toslices()]


def _run(stitcher: BandStitcher, tiles, **thresholds) -> Blocks:
    blocks: Blocks = []
    for index, (probs, valid) in enumerate(tiles):
        blocks.extend(stitcher.add(index, probs, valid, **thresholds))
    assert stitcher.done
    return blocks


def _assemble(blocks: Blocks, grid: TileGrid, channels: int):
    """Full-scene (labels (H, W), probs (C, H, W), valid (H, W), times written (H, W)) from emitted blocks."""
    labels = np.zeros((grid.height, grid.width), np.uint8)
    probs = np.zeros((channels, grid.height, grid.width), np.float32)
    valid = np.zeros((grid.height, grid.width), bool)
    written = np.zeros((grid.height, grid.width), int)
    for block in blocks:
        rows, cols = block.window.toslices()
        labels[rows, cols], probs[:, rows, cols], valid[rows, cols] = block.labels, block.probs, block.valid
        written[rows, cols] += 1
    return labels, probs, valid, written


def _brute_force(grid: TileGrid, tiles: list) -> tuple[np.ndarray, np.ndarray]:
    """Reference: accumulate every tile over the whole (padded) scene at once; (probs (C, H, W), valid (H, W))."""
    channels = next(probs.shape[0] for probs, _ in tiles if probs is not None)
    size = grid.tile_size
    numerator = np.zeros((channels, grid.height + size, grid.width + size), np.float64)
    denominator = np.zeros((grid.height + size, grid.width + size), np.float64)
    weights = blend_weights(size, grid.overlap).astype(np.float64)
    for window, (probs, valid) in zip(grid, tiles, strict=True):
        if probs is None:
            continue
        tile_weights = weights * (np.ones((size, size)) if valid is None else valid)
        numerator[(slice(None), *window.toslices())] += tile_weights * probs
        denominator[window.toslices()] += tile_weights
    numerator, denominator = numerator[:, : grid.height, : grid.width], denominator[: grid.height, : grid.width]
    covered = denominator > 0
    return np.where(covered, numerator / np.where(covered, denominator, 1.0), 0.0), covered


def _random_tiles(grid: TileGrid, channels: int, empty: set[int], seed: int = 0) -> list:
    """Independent random tiles (so overlapping tiles disagree), random holes in ``valid``, ``empty`` -> None."""
    rng = np.random.default_rng(seed)
    tiles = []
    for index in range(len(grid)):
        probs = rng.dirichlet(np.ones(channels), (grid.tile_size, grid.tile_size)).transpose(2, 0, 1)
        valid = rng.random((grid.tile_size, grid.tile_size)) > 0.2
        tiles.append((None, None) if index in empty else (probs.astype(np.float32), valid))
    return tiles


class TestBandStitcher:
    def test_constant_tiles_give_constant_result(self) -> None:
        grid = TileGrid(75, 53, 32, 8)
        probs = np.array([0.2, 0.7, 0.1], np.float32)[:, None, None]
        field = np.broadcast_to(probs, (3, 53, 75))
        labels, stitched, valid, _ = _assemble(_run(BandStitcher(grid, 3), _tiles_of(grid, field)), grid, 3)
        assert (labels == 1).all() and valid.all()
        np.testing.assert_allclose(stitched, field, rtol=1e-6)

    @pytest.mark.parametrize(("width", "height", "tile", "overlap"), [(75, 53, 32, 8), (90, 100, 20, 6)])
    def test_reproduces_a_smooth_field(self, width: int, height: int, tile: int, overlap: int) -> None:
        # every tile tells the truth, so the weighted mean must return the field exactly (no seams, no shift)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        field = np.stack([rows / height, cols / width])
        grid = TileGrid(width, height, tile, overlap)
        _, stitched, valid, _ = _assemble(_run(BandStitcher(grid, 2), _tiles_of(grid, field)), grid, 2)
        assert valid.all()
        np.testing.assert_allclose(stitched, field, atol=1e-6)

    @pytest.mark.parametrize(
        ("width", "height", "tile", "overlap", "empty"),
        [
            (75, 53, 32, 8, {0, 4}),  # sizes not multiples of the stride, 3 x 2 tiles
            (90, 100, 20, 6, {0, 7, 13, 20, 41}),  # many bands: the overlap carries through several shifts
            (56, 56, 32, 8, {3}),  # last tile ends exactly at the edge; last tile empty
            (101, 40, 50, 0, {1}),  # no overlap
            (10, 7, 32, 8, set()),  # scene smaller than one tile
        ],
    )
    def test_equals_brute_force_accumulation(
        self, width: int, height: int, tile: int, overlap: int, empty: set[int]
    ) -> None:
        grid = TileGrid(width, height, tile, overlap)
        tiles = _random_tiles(grid, 3, empty)
        labels, stitched, valid, written = _assemble(_run(BandStitcher(grid, 3), tiles), grid, 3)
        expected, covered = _brute_force(grid, tiles)
        assert (written == 1).all()
        np.testing.assert_array_equal(valid, covered)
        np.testing.assert_allclose(stitched, expected, atol=1e-5)
        top_two = np.sort(expected, axis=0)[-2:]
        decided = covered & (top_two[1] - top_two[0] > 1e-4)  # skip near-ties that rounding may flip
        np.testing.assert_array_equal(labels[decided], expected.argmax(axis=0)[decided])
        assert (labels[~covered] == NODATA_LABEL).all() and (stitched[:, ~covered] == 0).all()
        if 0 in empty and overlap:
            # tile 0 alone covers the top-left stride x stride corner; skipped, it must stay nodata
            assert not valid[: grid.stride, : grid.stride].any()

    def test_blocks_partition_the_scene_in_row_order(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tiles_module, "BLOCK_WIDTH", 20)  # several blocks per band
        grid = TileGrid(75, 53, 32, 8)
        stitcher = BandStitcher(grid, 2)
        field = np.zeros((2, 53, 75), np.float32)
        emitted: list[tuple[int, list[Window]]] = []
        for index, (probs, valid) in enumerate(_tiles_of(grid, field)):
            windows = [block.window for block in stitcher.add(index, probs, valid)]
            if windows:
                emitted.append((index, windows))
        # one band per tile row, emitted with the row's last tile: rows [0, 24), then [24, 53)
        assert [index for index, _ in emitted] == [2, 5]
        assert emitted[0][1] == [Window(0, 0, 20, 24), Window(20, 0, 20, 24), Window(40, 0, 20, 24),
                                 Window(60, 0, 15, 24)]
        windows = [window for _, row in emitted for window in row]
        assert {(w.row_off, w.height) for w in emitted[1][1]} == {(24, 29)}
        assert [(w.row_off, w.col_off) for w in windows] == sorted((w.row_off, w.col_off) for w in windows)
        coverage = np.zeros((53, 75), int)
        for window in windows:
            coverage[window.toslices()] += 1
        assert (coverage == 1).all()

    def test_order_is_enforced(self) -> None:
        grid = TileGrid(75, 53, 32, 8)
        stitcher = BandStitcher(grid, 2)
        tile = np.full((2, 32, 32), 0.5, np.float32)
        with pytest.raises(ValueError, match="row-major order: expected 0, got 1"):
            stitcher.add(1, tile)
        with pytest.raises(ValueError, match=r"probs must have shape \(2, 32, 32\)"):
            stitcher.add(0, np.zeros((3, 32, 32), np.float32))
        assert list(stitcher.add(0, tile)) == []  # the failed add did not use up index 0
        with pytest.raises(ValueError, match="expected 1, got 0"):
            stitcher.add(0, tile)
        with pytest.raises(ValueError, match="expected 1, got 2"):
            stitcher.add(2, tile)  # no gaps
        stitcher.add(1, tile)
        blocks = stitcher.add(2, tile)  # ends the first tile row
        with pytest.raises(RuntimeError, match="tile row 0 were not all consumed"):
            stitcher.add(3, tile)
        assert len(list(blocks)) == 1
        for index in range(3, 6):
            list(stitcher.add(index, None))
        assert stitcher.done
        with pytest.raises(ValueError, match="all 6 tiles were already added"):
            stitcher.add(6, tile)

    def test_invalid_pixels_and_threshold(self) -> None:
        field = np.zeros((3, 53, 75), np.float32)
        field[0, :, :40] = 0.9  # confident class 0 on the left
        field[1, :, 40:] = 0.4  # unsure class 1 on the right
        valid = np.ones((53, 75), bool)
        valid[:5] = False
        grid = TileGrid(75, 53, 32, 8)
        blocks = _run(BandStitcher(grid, 3), _tiles_of(grid, field, valid), prob_thd=0.5, bg_index=2)
        labels, probs, stitched_valid, _ = _assemble(blocks, grid, 3)
        assert (labels[:5] == NODATA_LABEL).all() and not stitched_valid[:5].any()
        assert (probs[:, :5] == 0).all()
        assert (labels[5:, :40] == 0).all() and (labels[5:, 40:] == 2).all()
        # without a threshold the unsure class stays
        labels, *_ = _assemble(_run(BandStitcher(grid, 3), _tiles_of(grid, field, valid)), grid, 3)
        assert (labels[5:, 40:] == 1).all()

    def test_validation(self) -> None:
        grid = TileGrid(75, 53, 32, 8)
        stitcher = BandStitcher(grid, 2)
        tile = np.zeros((2, 32, 32), np.float32)
        with pytest.raises(ValueError, match=r"valid must have shape \(32, 32\)"):
            stitcher.add(0, tile, np.ones((32, 31), bool))
        with pytest.raises(ValueError, match=r"prob_thd must be in \[0, 1\], got 1.5"):
            stitcher.add(0, tile, prob_thd=1.5)
        with pytest.raises(ValueError, match="bg_index must be in 0..1, got 2"):
            stitcher.add(0, tile, prob_thd=0.5, bg_index=2)
        with pytest.raises(ValueError, match="num_classes must be in 1..255"):
            BandStitcher(grid, 256)
        assert BandStitcher(grid, 255).num_classes == 255  # labels 0..254 leave 255 for nodata

    def test_memory_is_one_band(self) -> None:
        # a tall scene costs no more than a short one of the same width: one band of tile_size rows
        for height in (53, 5000):
            stitcher = BandStitcher(TileGrid(75, height, 32, 8), 4)
            assert stitcher.band_shape == (5, 32, 75)
            assert stitcher._band.shape == stitcher.band_shape and stitcher._band.dtype == np.float32

    @pytest.mark.parametrize("holes", [False, True])
    def test_without_overlap_each_pixel_is_its_tile_exactly(self, holes: bool) -> None:
        # one tile per pixel and weight 1: p * 1 / 1 is p to the bit, on the all-valid fast path and off it
        grid = TileGrid(101, 70, 32, 0)
        tiles = [(probs, valid if holes else None) for probs, valid in _random_tiles(grid, 3, set(), seed=3)]
        labels, stitched, valid, _ = _assemble(_run(BandStitcher(grid, 3), tiles), grid, 3)
        field = np.zeros((3, grid.height + 32, grid.width + 32), np.float32)
        covered = np.zeros(field.shape[1:], bool)
        for window, (probs, tile_valid) in zip(grid, tiles, strict=True):
            field[(slice(None), *window.toslices())] = probs
            covered[window.toslices()] = True if tile_valid is None else tile_valid
        field, covered = field[:, : grid.height, : grid.width], covered[: grid.height, : grid.width]
        np.testing.assert_array_equal(valid, covered)
        np.testing.assert_array_equal(stitched, np.where(covered, field, 0))
        np.testing.assert_array_equal(labels[covered], field.argmax(axis=0)[covered])


class TestDirectTarget:
    """Probabilities written into the band's own cells give the blocks add() gives, bit for bit."""

    @staticmethod
    def _direct(grid: TileGrid, tiles: list) -> tuple[Blocks, int]:
        stitcher, blocks, direct = BandStitcher(grid, 3), [], 0
        for index, (probs, valid) in enumerate(tiles):
            target = None if probs is None else stitcher.direct_target(index, valid)
            if target is not None:
                target[...] = probs
                probs, direct = target, direct + 1
            blocks.extend(stitcher.add(index, probs, valid))
        assert stitcher.done
        return blocks, direct

    @staticmethod
    def _flat(blocks: Blocks) -> list[tuple]:
        return [(tuple(b.window.flatten()), b.labels.tobytes(), b.probs.tobytes(), b.valid.tobytes()) for b in blocks]

    def test_same_blocks_as_adding(self) -> None:
        grid = TileGrid(101, 70, 25, 0)  # 5 x 3 tiles, the last column past the right edge
        tiles = _random_tiles(grid, 3, {7})
        for index in (0, 1, 2, 5, 6):  # all valid: these may be written directly
            tiles[index] = (tiles[index][0], np.ones_like(tiles[index][1]))
        blocks, direct = self._direct(grid, tiles)
        assert direct == 5
        assert self._flat(blocks) == self._flat(_run(BandStitcher(grid, 3), tiles))

    def test_none_where_the_weights_are_not_all_one(self) -> None:
        ones = np.ones((25, 25), bool)
        holes = ones.copy()
        holes[3, 4] = False
        assert BandStitcher(TileGrid(100, 50, 25, 5), 3).direct_target(0, ones) is None  # overlap
        stitcher = BandStitcher(TileGrid(90, 50, 25, 0), 3)
        assert stitcher.direct_target(0, holes) is None  # nodata pixels
        assert stitcher.direct_target(1, ones) is None  # not the next tile
        assert stitcher.direct_target(0, ones).shape == (3, 25, 25)
        for index in range(3):
            list(stitcher.add(index, np.ones((3, 25, 25), np.float32), ones))
        assert stitcher.direct_target(3, ones) is None  # past the right edge (padding columns)


class TestDeviceBand:
    """A band held as a torch tensor (on the CPU here; on a GPU in a CUDA run) gives the numpy band's blocks bit
    for bit: the same element-wise sums, products and divisions, the same label rule."""

    CASES = [(75, 53, 32, 8, {0, 4}), (90, 100, 20, 6, {0, 7, 13}), (101, 40, 50, 0, {1}), (10, 7, 32, 8, set())]

    @staticmethod
    def _on_device(stitcher: BandStitcher, tiles: list, direct: bool = False, **thresholds) -> Blocks:
        import torch

        blocks = []
        for index, (probs, valid) in enumerate(tiles):
            tensor = None if probs is None else torch.from_numpy(probs)
            target = stitcher.direct_target(index, valid) if direct and probs is not None else None
            if target is not None:
                target.copy_(tensor)
                tensor = target
            blocks.extend(stitcher.add(index, tensor, valid, **thresholds))
        assert stitcher.done
        return blocks

    @pytest.mark.parametrize(("width", "height", "tile", "overlap", "empty"), CASES)
    def test_same_blocks_as_the_numpy_band(self, width, height, tile, overlap, empty) -> None:
        import torch

        grid = TileGrid(width, height, tile, overlap)
        tiles = _random_tiles(grid, 3, empty)
        if not overlap:  # some tiles all valid: the direct writes
            tiles = [(p, None if p is None or i % 2 else v) for i, (p, v) in enumerate(tiles)]
        expected = TestDirectTarget._flat(_run(BandStitcher(grid, 3), tiles, prob_thd=0.4, bg_index=1))
        cpu = torch.device("cpu")
        for direct in (False, True):
            blocks = self._on_device(BandStitcher(grid, 3, device=cpu), tiles, direct, prob_thd=0.4, bg_index=1)
            assert all(isinstance(b.probs, np.ndarray) and b.labels.dtype == np.uint8 for b in blocks)
            assert TestDirectTarget._flat(blocks) == expected, direct

    def test_without_probabilities_the_blocks_carry_none(self) -> None:
        import torch

        grid = TileGrid(75, 53, 32, 8)
        tiles = _random_tiles(grid, 3, {2})
        expected = _run(BandStitcher(grid, 3), tiles)
        for stitcher in (BandStitcher(grid, 3, probabilities=False),
                         BandStitcher(grid, 3, device=torch.device("cpu"), probabilities=False)):
            blocks = (self._on_device(stitcher, tiles) if stitcher.device is not None
                      else _run(stitcher, tiles))
            assert [b.probs for b in blocks] == [None] * len(expected)
            for block, reference in zip(blocks, expected, strict=True):
                np.testing.assert_array_equal(block.labels, reference.labels)
                np.testing.assert_array_equal(block.valid, reference.valid)


class TestFinalizeBlock:
    def test_unit_weights_keep_the_sums_and_copy_them(self) -> None:
        """Weights all 1 (no overlap, no nodata): p / 1 == p, so the division is skipped; the block owns its
        probabilities, since the stitcher clears its band afterwards."""
        generator = np.random.default_rng(0)
        accumulated = np.concatenate([generator.random((3, 4, 5), np.float32), np.ones((1, 4, 5), np.float32)])
        block = tiles_module.finalize_block(accumulated, Window(0, 0, 5, 4), 0.0, 0)
        np.testing.assert_array_equal(block.probs, accumulated[:-1] / accumulated[-1])
        np.testing.assert_array_equal(block.labels, accumulated[:-1].argmax(axis=0))
        accumulated[:] = 0
        assert block.probs.any()

    def test_other_weights_are_divided(self) -> None:
        accumulated = np.ones((3, 2, 2), np.float32)
        accumulated[-1, 0, 0] = 2.0
        accumulated[-1, 1, 1] = 0.0  # no tile: nodata
        block = tiles_module.finalize_block(accumulated, Window(0, 0, 2, 2), 0.0, 0)
        assert block.probs[:, 0, 0].tolist() == [0.5, 0.5] and block.probs[:, 0, 1].tolist() == [1.0, 1.0]
        assert block.labels[1, 1] == tiles_module.NODATA_LABEL and not block.valid[1, 1]


class TestReadAhead:
    def test_results_in_order_and_errors_where_they_belong(self) -> None:
        windows = [Window(col, 0, 4, 4) for col in range(6)]

        def read(window: Window) -> int:
            if window.col_off == 4:
                raise OSError("truncated file")
            return int(window.col_off) * 10

        results = tiles_module.read_ahead(read, windows, depth=2)
        assert [next(results) for _ in range(4)] == [0, 10, 20, 30]
        with pytest.raises(OSError, match="truncated file"):
            next(results)

    def test_reads_run_ahead_in_one_other_thread_and_stop_when_closed(self) -> None:
        import threading

        calls: list[tuple[int, str]] = []

        def read(window: Window) -> int:
            calls.append((int(window.col_off), threading.current_thread().name))
            return int(window.col_off)

        results = tiles_module.read_ahead(read, (Window(col, 0, 1, 1) for col in range(100)), depth=3)
        assert next(results) == 0
        results.close()  # waits for the reads in flight: at most depth + 1 were ever asked for
        assert [col for col, _ in calls] == list(range(len(calls))) and 1 <= len(calls) <= 4
        assert all(name.startswith("coninfer-read-ahead") for _, name in calls)
