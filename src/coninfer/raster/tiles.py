"""Tiling arithmetic and seamless stitching of per-tile class probabilities.

Tile size (defaults in :class:`coninfer.settings.SceneOptions`): 448 source pixels, fed to the models at 448 x 448, i.e.
at the source's native resolution. The models then see the ground at the source GSD, as in the paper, whose
448² crops come from 0.3-1 m imagery; the ViT/16 encoders turn such a tile into a 28 x 28 patch grid.

Overlap: neighbouring tiles share ``overlap`` pixels; :func:`blend_weights` ramps each tile's weight linearly
across that band, so the weighted mean of overlapping probabilities changes smoothly from one tile to the next
(no seams). An overlap of 64 px (1/7 of a tile) costs about (448/384)² = 1.36 times the tiles of a
non-overlapping grid; the default is 0, the paper's setting.

Large scenes: :class:`BandStitcher` takes tiles row-major and holds only one band of ``tile_size`` rows across
the scene width, (C + 1, tile_size, width) float32, emitting each band's final blocks as soon as the next tile
row can no longer reach them. Memory is therefore bounded by the scene width, never its area (a 20,000 px
wide scene with 10 classes and 448 px tiles needs 11 * 448 * 20,000 * 4 B = 394 MB).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import numpy as np
from rasterio.windows import Window

from coninfer.postprocess import labels_from_probabilities, labels_from_probabilities_np

NODATA_LABEL = 255
"""Label of invalid pixels in class maps; class indexes therefore run 0..254."""
BLOCK_WIDTH = 2048
"""Width of the blocks a finished band is emitted in (bounds the temporaries of the final division)."""
T = TypeVar("T")


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``tile_size`` pixels laid row-major over a ``width`` x ``height`` raster.

    With stride ``s = tile_size - overlap``, tile (row r, column c) starts at pixel ``(c*s, r*s)`` and there are
    ``n_cols = 1 + ceil(max(width - tile_size, 0) / s)`` columns (rows alike), the fewest that reach the right
    edge. Edge tiles keep the full ``tile_size``: the part beyond the raster is padding (read as invalid
    pixels), not dropped. ``overlap < tile_size / 2`` keeps the two blend ramps of a tile apart, so each pixel
    lies in at most two tiles per axis.
    """

    width: int
    height: int
    tile_size: int
    overlap: int

    def __post_init__(self) -> None:
        for name in ("width", "height", "tile_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TileGrid {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= 2 * self.overlap < self.tile_size:
            raise ValueError(
                f"TileGrid overlap must be >= 0 and < tile_size / 2 = {self.tile_size / 2}, got {self.overlap}"
            )

    @property
    def stride(self) -> int:
        """Pixels between the origins of neighbouring tiles: ``tile_size - overlap``."""
        return self.tile_size - self.overlap

    @property
    def n_cols(self) -> int:
        return 1 + math.ceil(max(self.width - self.tile_size, 0) / self.stride)

    @property
    def n_rows(self) -> int:
        return 1 + math.ceil(max(self.height - self.tile_size, 0) / self.stride)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def window(self, index: int) -> Window:
        """Window of tile ``index`` (row-major: ``row = index // n_cols``); always tile_size x tile_size."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range 0..{len(self) - 1}")
        row, col = divmod(index, self.n_cols)
        return Window(col * self.stride, row * self.stride, self.tile_size, self.tile_size)

    def windows(self) -> list[Window]:
        """All tile windows, row-major."""
        return [self.window(i) for i in range(len(self))]

    def __iter__(self) -> Iterator[Window]:
        return (self.window(i) for i in range(len(self)))

    def warm_up_row(self, row: int) -> int:
        """The first tile row reaching the pixels that tile row ``row`` finishes (``[row*s, (row+1)*s)``):
        ``row - 1`` with overlap, whose last ``overlap`` rows fall there (overlap < s, so no row before), else
        ``row``. A stitch of the rows from ``row`` on starts by adding the tiles of this row."""
        return max(0, row - 1) if self.overlap else row


def block_windows(width: int, height: int, block_size: int = 1024) -> Iterator[Window]:
    """Non-overlapping windows of at most ``block_size`` pixels a side covering the raster, row-major.

    Edge blocks are clipped to the raster (unlike tiles), so they suit finalizing and writing.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for row_off in range(0, height, block_size):
        for col_off in range(0, width, block_size):
            yield Window(
                col_off, row_off, min(block_size, width - col_off), min(block_size, height - row_off)
            )


def blend_weights(tile_size: int, overlap: int) -> np.ndarray:
    """Per-pixel weights of one tile for blending overlapping tiles.

    1-D ramp ``r(i) = min(1, (i + 0.5) / overlap, (tile_size - i - 0.5) / overlap)`` for i in 0..tile_size-1,
    and weight = outer(r, r). Across an overlap band the falling ramp of one tile and the rising ramp of the
    next sum to exactly 1 (``(overlap - j - 0.5)/overlap + (j + 0.5)/overlap``), and products of such pairs sum
    to 1 at corners, so blended probabilities vary linearly between tiles. All weights are >= 0.5 / overlap > 0.
    With ``overlap = 0`` every weight is 1.

    Returns:
        (tile_size, tile_size) float32.
    """
    TileGrid(tile_size, tile_size, tile_size, overlap)  # same validation as the grid
    positions = np.arange(tile_size, dtype=np.float64) + 0.5
    if overlap == 0:
        ramp = np.ones(tile_size)
    else:
        ramp = np.minimum(1.0, np.minimum(positions, tile_size - positions) / overlap)
    return np.outer(ramp, ramp).astype(np.float32)


@dataclass(frozen=True)
class StitchedBlock:
    """Final result of one block: ``labels`` (h, w) uint8 (255 = invalid), ``probs`` (C, h, w) float32
    (0 where invalid; None from a stitcher told that no output needs them), ``valid`` (h, w) bool."""

    window: Window
    labels: np.ndarray
    probs: np.ndarray | None
    valid: np.ndarray


class BandStitcher:
    """Blends tiles added in row-major order into final blocks, holding one band of tile rows in memory.

    Tile row ``r`` covers source rows ``[r*s, r*s + T)`` (``s`` = stride, ``T`` = tile size) and row ``r + 1``
    starts at ``(r + 1)*s``, so once row ``r`` is complete the rows ``[r*s, (r + 1)*s)`` can receive nothing
    more and are final (the last tile row finishes the raster). The accumulator is therefore one band
    (C + 1, T, W) float32 (:attr:`band_shape`), whatever the scene height: channels 0..C-1 hold
    ``sum(w * valid * p)`` and channel C holds ``sum(w * valid)``, ``w`` from :func:`blend_weights`. After a
    band is emitted it moves up by one stride, carrying the ``overlap`` rows still shared with the next row.

    Usage::

        stitcher = BandStitcher(grid, num_classes)
        for index in range(len(grid)):
            for block in stitcher.add(index, probs_or_none, valid):
                write(block)
        assert stitcher.done
    """

    def __init__(self, grid: TileGrid, num_classes: int, *, first_row: int = 0, device=None,
                 probabilities: bool = True) -> None:
        """``first_row``: the tile row the first :meth:`add` belongs to (a share of the scene, see
        :meth:`TileGrid.warm_up_row`); its rows start from an empty band, as rows whose earlier tiles cannot reach
        them do in a whole-scene pass.

        ``device`` (a torch device): the band lives there and tiles' probabilities are (C, T, T) float32 tensors
        on it; only the blocks' labels and validity come to the host (and their probabilities, unless
        ``probabilities`` is False: then blocks carry ``probs=None``). The arithmetic is the numpy band's, element
        by element (sums, products and divisions are correctly rounded on both), so the blocks are the same bit
        for bit given the same tile probabilities. None: a numpy band (fastest on the CPU)."""
        if not 1 <= num_classes <= NODATA_LABEL:
            raise ValueError(f"num_classes must be in 1..{NODATA_LABEL}, got {num_classes}")
        if not 0 <= first_row <= grid.n_rows:
            raise ValueError(f"first_row must be in 0..{grid.n_rows}, got {first_row}")
        self.grid = grid
        self.num_classes = num_classes
        self.device = device
        self.probabilities = probabilities
        self._weights = blend_weights(grid.tile_size, grid.overlap)
        if device is None:
            self._band = np.zeros(self.band_shape, np.float32)
        else:
            import torch

            self._weights = torch.from_numpy(self._weights).to(device)
            self._band = torch.zeros(self.band_shape, dtype=torch.float32, device=device)
        self._next_index = first_row * grid.n_cols
        self._direct = None  # the cells handed out by direct_target(), until add() takes them
        # tile row whose blocks add() returned but were not all consumed yet; the band moves on only after
        self._pending_row: int | None = None

    @property
    def band_shape(self) -> tuple[int, int, int]:
        """Shape of the accumulator, (C + 1, tile_size, width): the stitcher's memory is 4 bytes times this."""
        return (self.num_classes + 1, self.grid.tile_size, self.grid.width)

    @property
    def done(self) -> bool:
        """True once every tile was added and every block emitted."""
        return self._next_index == len(self.grid) and self._pending_row is None

    def direct_target(self, index: int, valid: np.ndarray | None = None) -> np.ndarray | None:
        """The band's own (C, T, T) cells of tile ``index``, for its probabilities to be written into rather than
        added, or None where they cannot: with no overlap each cell is written by one tile only and is still 0,
        and a tile inside the raster's width whose pixels are all valid has every weight 1, so writing p there
        gives exactly the 0 + p * 1 that :meth:`add` would. Pass the array, once written, to :meth:`add` as
        ``probs``; it then adds only the weights (the stitch pass of a 4000² scene ~8% faster on a 2-core CPU,
        measured against adding in one run)."""
        size = self.grid.tile_size
        col = int(self.grid.window(index).col_off)
        if self.grid.overlap or index != self._next_index or col + size > self.grid.width:
            return None
        if valid is not None and not np.asarray(valid).all():
            return None
        self._direct = self._band[:-1, :, col : col + size]  # a view of the band: numpy, or a device tensor
        return self._direct

    def add(
        self,
        index: int,
        probs: np.ndarray | None,
        valid: np.ndarray | None = None,
        *,
        prob_thd: float = 0.0,
        bg_index: int = 0,
        emit: bool = True,
    ) -> Iterator[StitchedBlock]:
        """Add tile ``index`` and return the blocks that became final (empty unless it ends a tile row).

        The tile is validated and accumulated at once; the returned blocks (row order, at most
        :data:`BLOCK_WIDTH` wide) are computed as they are iterated and must all be consumed before the next
        ``add``.

        Args:
            index: tile index; tiles must come in order 0, 1, 2, ... without gaps.
            probs: (C, T, T) class probabilities, or None for an empty (skipped) tile that adds nothing; or the
                array :meth:`direct_target` gave for this tile, written.
            valid: (T, T) bool, False where the tile has no data; None: all valid.
            prob_thd: pixels whose top probability is below it get ``bg_index`` (0: off), in emitted blocks.
            bg_index: background class, 0..C-1.
            emit: False drops the blocks a completed row would return, without computing them (a warm-up row
                whose blocks another rank writes); the band moves on as usual.
        """
        if self._pending_row is not None:
            raise RuntimeError(
                f"the blocks of tile row {self._pending_row} were not all consumed: iterate over what add() "
                "returns before adding the next tile"
            )
        if index != self._next_index:
            raise ValueError(f"tiles must be added in row-major order: expected {self._next_index}, got {index}")
        if index >= len(self.grid):
            raise ValueError(f"all {len(self.grid)} tiles were already added, got index {index}")
        if not 0.0 <= prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {prob_thd}")
        if not 0 <= bg_index < self.num_classes:
            raise ValueError(f"bg_index must be in 0..{self.num_classes - 1}, got {bg_index}")
        direct, self._direct = self._direct, None
        if probs is not None and probs is direct:
            col = int(self.grid.window(index).col_off)
            self._band[-1, :, col : col + self.grid.tile_size] += 1.0
        elif probs is not None:
            self._accumulate(index, probs, valid)
        self._next_index += 1
        if self._next_index % self.grid.n_cols:
            return iter(())
        if not emit:
            self._shift()
            return iter(())
        self._pending_row = index // self.grid.n_cols
        return self._emit(self._pending_row, prob_thd, bg_index)

    def _accumulate(self, index: int, probs, valid: np.ndarray | None) -> None:
        size = self.grid.tile_size
        probs = np.asarray(probs) if self.device is None else probs
        if tuple(probs.shape) != (self.num_classes, size, size):
            raise ValueError(f"probs must have shape {(self.num_classes, size, size)}, got {tuple(probs.shape)}")
        weights = self._weights
        if valid is not None:
            valid = np.asarray(valid)
            if valid.shape != (size, size):
                raise ValueError(f"valid must have shape {(size, size)}, got {valid.shape}")
        col = int(self.grid.window(index).col_off)
        width = min(size, self.grid.width - col)  # columns past the right edge are padding
        target = self._band[:, :, col : col + width]
        if self.grid.overlap == 0 and (valid is None or valid[:, :width].all()):
            # every weight is 1 and p * 1 == p exactly: one pass instead of a product and a sum
            target[:-1] += probs[:, :, :width]
            target[-1] += 1.0
            return
        if valid is not None:
            mask = valid.astype(bool)
            weights = weights * (mask if self.device is None else torch_from(mask, self.device))
        target[:-1] += probs[:, :, :width] * weights[:, :width]
        target[-1] += weights[:, :width]

    def _emit(self, tile_row: int, prob_thd: float, bg_index: int) -> Iterator[StitchedBlock]:
        grid = self.grid
        top = tile_row * grid.stride
        # the last tile row reaches the bottom edge (rows past it are padding); others finish one stride
        rows = grid.height - top if tile_row == grid.n_rows - 1 else grid.stride
        finalize = finalize_block if self.device is None else finalize_block_torch
        for col in range(0, grid.width, BLOCK_WIDTH):
            width = min(BLOCK_WIDTH, grid.width - col)
            block = self._band[:, :rows, col : col + width]
            yield finalize(block, Window(col, top, width, rows), prob_thd, bg_index, self.probabilities)
        self._shift()
        self._pending_row = None

    def _shift(self) -> None:
        """Move the band up one stride: the overlap rows carry over, the rest starts empty."""
        carried = self.grid.tile_size - self.grid.stride
        rest = self._band[:, self.grid.stride :]
        # torch refuses a copy between overlapping parts of one tensor; numpy buffers it
        self._band[:, :carried] = rest if self.device is None else rest.clone()
        self._band[:, carried:] = 0.0


def torch_from(array: np.ndarray, device):
    """``array`` as a tensor on ``device``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def read_ahead(read: Callable[[Window], T], windows: Iterable[Window], depth: int = 2) -> Iterator[T]:
    """``read(window)`` for each window, in order, run ``depth`` windows ahead in one worker thread.

    GDAL releases the GIL while it reads and decodes, so the next tiles are read while the caller computes on
    the current one. The reads run one at a time (a dataset handle is not safe for concurrent use); an error
    is raised where its window's result is taken. Closing the iterator early waits for the reads in flight.
    """
    from concurrent.futures import ThreadPoolExecutor

    windows = iter(windows)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="coninfer-read-ahead") as pool:
        pending = deque(pool.submit(read, window) for window in islice(windows, max(1, depth)))
        while pending:
            result = pending.popleft().result()
            following = next(windows, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            yield result


def finalize_block(accumulated: np.ndarray, window: Window, prob_thd: float, bg_index: int,
                   probabilities: bool = True) -> StitchedBlock:
    """Final labels and probabilities from an accumulator block (C + 1, h, w) of ``window``.

    ``probs = sum(w p) / sum(w)``; ``labels = argmax`` (first index on ties); pixels whose top probability is
    below ``prob_thd`` get ``bg_index``; pixels no tile covered with valid data get 255 and probability 0.
    ``probabilities`` False: the block carries ``probs=None`` (and no copy of them is made).
    """
    weight_sum = accumulated[-1]
    valid = weight_sum > 0
    if (weight_sum == 1.0).all():  # no overlap and no nodata: p / 1 == p exactly, so the division is skipped
        probs = accumulated[:-1].copy() if probabilities else accumulated[:-1]
    else:
        probs = accumulated[:-1] / (weight_sum if valid.all() else np.where(valid, weight_sum, 1.0))
    labels = labels_from_probabilities_np(probs, prob_thd, bg_index)
    labels[~valid] = NODATA_LABEL
    return StitchedBlock(window=window, labels=labels, valid=valid,
                         probs=probs.astype(np.float32, copy=False) if probabilities else None)


def finalize_block_torch(accumulated, window: Window, prob_thd: float, bg_index: int,
                         probabilities: bool = True) -> StitchedBlock:
    """:func:`finalize_block` of a (C + 1, h, w) float32 tensor on any device, with the same arithmetic and label
    rule; labels and validity come to the host as uint8 and bool, the probabilities only if ``probabilities``.
    The weight sums are divided by even where they are all 1 (p / 1 == p: the same values, and no host sync
    for the check)."""
    import torch

    weight_sum = accumulated[-1]
    valid = weight_sum > 0
    probs = accumulated[:-1] / torch.where(valid, weight_sum, torch.ones_like(weight_sum))
    labels = labels_from_probabilities(probs, prob_thd, bg_index).to(torch.uint8)
    labels.masked_fill_(~valid, NODATA_LABEL)
    return StitchedBlock(window=window, labels=labels.cpu().numpy(), valid=valid.cpu().numpy(),
                         probs=probs.cpu().numpy() if probabilities else None)


__all__ = [
    "BLOCK_WIDTH",
    "NODATA_LABEL",
    "StitchedBlock",
    "TileGrid",
    "blend_weights",
    "block_windows",
    "finalize_block",
    "finalize_block_torch",
    "read_ahead",
]
