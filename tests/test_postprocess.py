"""Tests for coninfer.postprocess: golden parity (section B), order of operations, ties, threshold, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coninfer import postprocess as postprocess_module
from coninfer.errors import InputError
from coninfer.postprocess import (
    class_probabilities,
    labels_from_probabilities,
    labels_from_probabilities_np,
    patches_to_grid,
    postprocess,
)


def _bilinear_reference(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel bilinear resize (h, w) -> (H, W) written from the README formula, in float64."""

    def axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, in_size - 1), source - low

    y0, y1, fy = axis(height, grid.shape[0])
    x0, x1, fx = axis(width, grid.shape[1])
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


class TestGolden:
    def test_every_case_matches_official(self, golden_dir: Path) -> None:
        cases = sorted(golden_dir.glob("post_case*.npz"))
        assert cases, f"no post_case*.npz in {golden_dir}"
        for path in cases:
            with np.load(path, allow_pickle=False) as archive:
                grid = patches_to_grid(torch.from_numpy(archive["z"]), 28, 28)
                np.testing.assert_array_equal(grid.numpy(), archive["seg_grid"], err_msg=path.name)
                result = postprocess(
                    grid,
                    tuple(int(size) for size in archive["ori_shape"]),
                    archive["query_idx"].tolist(),
                    logit_scale=float(archive["logit_scale"]),
                    prob_thd=float(archive["prob_thd"]),
                    bg_index=int(archive["bg_idx"]),
                )
                robust = ~archive["fragile"]
                labels = result.labels.numpy()
                assert labels.shape == archive["pred"].shape, path.name
                np.testing.assert_array_equal(labels[robust], archive["pred"][robust], err_msg=path.name)
                if "probs" in archive.files:
                    np.testing.assert_allclose(result.probabilities.numpy(), archive["probs"], rtol=0, atol=1e-6)


class TestClassProbabilities:
    def test_bilinear_half_pixel_on_raw_z(self) -> None:
        """Two queries, z1 = 0, scale 1: p0 = sigmoid(upsample(z0)), so the resize is observable exactly."""
        rng = np.random.default_rng(0)
        z0 = rng.uniform(0, 1, size=(3, 4))
        grid = torch.from_numpy(np.stack([z0, np.zeros_like(z0)])).float()
        probabilities = class_probabilities(grid, (7, 5), [0, 1], logit_scale=1.0)
        expected = 1 / (1 + np.exp(-_bilinear_reference(z0, 7, 5)))
        assert probabilities.shape == (2, 7, 5)
        np.testing.assert_allclose(probabilities[0].numpy(), expected, atol=1e-6)

    def test_synonyms_take_the_max_not_the_sum(self) -> None:
        grid = torch.tensor([0.9, 0.5, 0.7, 0.1]).reshape(1, 4, 1, 1)
        probabilities = class_probabilities(grid, (1, 1), [0, 1, 0, 1], logit_scale=5.0)
        query = torch.softmax(grid.flatten() * 5.0, dim=0)
        torch.testing.assert_close(probabilities.flatten(), torch.stack([query[[0, 2]].max(), query[[1, 3]].max()]))
        assert probabilities.sum() < 1  # no re-normalisation

    def test_unbatched_matches_batched(self) -> None:
        grid = torch.rand(2, 5, 6, 4)
        batched = class_probabilities(grid, (13, 9), [0, 1, 1, 2, 3])
        single = class_probabilities(grid[1], (13, 9), torch.tensor([0, 1, 1, 2, 3]))
        assert batched.shape == (2, 4, 13, 9) and single.shape == (4, 13, 9)
        torch.testing.assert_close(single, batched[1], rtol=0, atol=0)

    def test_patches_to_grid_is_row_major_per_image(self) -> None:
        z = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).reshape(24, 2)
        grid = patches_to_grid(z, 3, 4)
        assert grid.shape == (2, 2, 3, 4)
        # patch (row y, column x) of image b is flat index b*12 + y*4 + x
        assert grid[1, 0, 2, 3] == z[1 * 12 + 2 * 4 + 3, 0]
        assert grid[0, 1, 1, 0] == z[4, 1]

    @pytest.mark.parametrize(
        ("mapping", "message"),
        [([0, 1], "entries"), ([0, 2, 2], "have no query"), ([0, -1, 1], "negative"), ([0, 0.5, 1], "integer")],
    )
    def test_bad_query_to_class(self, mapping: list[int], message: str) -> None:
        with pytest.raises(InputError, match=message):
            class_probabilities(torch.rand(3, 2, 2), (4, 4), mapping)

    def test_bad_shapes(self) -> None:
        with pytest.raises(InputError, match="B\\*3\\*3"):
            patches_to_grid(torch.rand(10, 2), 3, 3)
        with pytest.raises(InputError, match="z_grid"):
            class_probabilities(torch.rand(4, 4), (8, 8), [0, 1])
        with pytest.raises(InputError, match="out_size"):
            class_probabilities(torch.rand(2, 4, 4), (0, 8), [0, 1])
        with pytest.raises(InputError, match="grid size"):
            patches_to_grid(torch.rand(10, 2), 0, 3)
        with pytest.raises(InputError, match="no queries"):
            class_probabilities(torch.rand(0, 4, 4), (8, 8), [])

    @pytest.mark.parametrize("logit_scale", [0.0, -5.0, float("nan"), float("inf")])
    def test_bad_logit_scale(self, logit_scale: float) -> None:
        with pytest.raises(InputError, match="logit_scale"):
            class_probabilities(torch.rand(2, 4, 4), (8, 8), [0, 1], logit_scale=logit_scale)


class TestWorkspace:
    def test_same_values_and_no_aliasing_across_sizes_and_layouts(self) -> None:
        from coninfer.postprocess import Workspace

        workspace = Workspace()
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(3 * 7 * 7, 5, generator=generator)
        grids = [patches_to_grid(z, 7, 7), patches_to_grid(z, 7, 7).contiguous(), patches_to_grid(z, 7, 7)[1]]
        results = []
        for grid in grids:
            for size in ((20, 30), (9, 9), (20, 30)):
                results.append((grid, size, class_probabilities(grid, size, [0, 0, 1, 2, 2], workspace=workspace)))
        for grid, size, result in results:  # later calls left earlier results alone
            torch.testing.assert_close(result, class_probabilities(grid, size, [0, 0, 1, 2, 2]), rtol=0, atol=0)

    @pytest.mark.parametrize(("queries", "side", "size"), [(10, 28, (448, 448)), (1, 5, (16, 16)), (3, 1, (5, 7))])
    def test_bit_for_bit_the_plain_torch_composition(self, queries: int, side: int, size: tuple[int, int]) -> None:
        """The buffers and out= kernels give F.interpolate -> * scale -> torch.softmax -> max over synonyms exactly
        (fp32 outputs of the scene path and the tile step must not move by a bit)."""
        import torch.nn.functional as F

        z = torch.randn(2 * side * side, queries, generator=torch.Generator().manual_seed(queries)) * 3
        mapping = [min(q, 2) for q in range(queries)]
        for grid in (patches_to_grid(z, side, side), patches_to_grid(z, side, side).contiguous()):
            expected = []
            for image in grid:
                up = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
                probs = torch.softmax(up * 5.0, dim=0)
                expected.append(torch.stack([probs[[q for q in range(queries) if mapping[q] == c]].amax(0)
                                             for c in range(max(mapping) + 1)]))
            torch.testing.assert_close(class_probabilities(grid, size, mapping), torch.stack(expected), rtol=0, atol=0)

    def test_buffers_are_reused_for_one_size(self) -> None:
        from coninfer.postprocess import Workspace

        workspace = Workspace()
        grid = patches_to_grid(torch.rand(2 * 16, 3), 4, 4)
        class_probabilities(grid, (12, 12), [0, 1, 2], workspace=workspace)
        first = {name: buffer.data_ptr() for name, buffer in workspace._buffers.items()}
        class_probabilities(grid, (12, 12), [0, 1, 2], workspace=workspace)
        assert {name: buffer.data_ptr() for name, buffer in workspace._buffers.items()} == first
        assert set(first) == {"upsampled", "scaled", "probs"}


class TestOutTensor:
    def test_writes_into_and_returns_out(self) -> None:
        grid = torch.rand(2, 4, 5, 5)
        expected = class_probabilities(grid, (11, 12), [0, 0, 1, 2])
        band = torch.zeros(2, 3, 11, 20)
        out = band[:, :, :, 4:16]  # strided, like the stitcher's band
        assert class_probabilities(grid, (11, 12), [0, 0, 1, 2], out=out) is out
        torch.testing.assert_close(band[:, :, :, 4:16], expected, rtol=0, atol=0)
        assert not band[:, :, :, :4].any() and not band[:, :, :, 16:].any()
        single = torch.empty(3, 11, 12)
        assert class_probabilities(grid[1], (11, 12), [0, 0, 1, 2], out=single) is single
        torch.testing.assert_close(single, expected[1], rtol=0, atol=0)

    @pytest.mark.parametrize("out", [torch.empty(2, 3, 11, 11), torch.empty(2, 3, 11, 12, dtype=torch.float64)])
    def test_bad_out(self, out: torch.Tensor) -> None:
        with pytest.raises(InputError, match="out must be a float32"):
            class_probabilities(torch.rand(2, 4, 5, 5), (11, 12), [0, 0, 1, 2], out=out)


class TestLabels:
    def test_first_index_wins_ties(self) -> None:
        probabilities = torch.tensor([0.4, 0.4, 0.2]).reshape(3, 1, 1).expand(3, 2, 2)
        assert (labels_from_probabilities(probabilities) == 0).all()
        probabilities = torch.tensor([0.2, 0.4, 0.4]).reshape(3, 1, 1).expand(3, 2, 2)
        assert (labels_from_probabilities(probabilities) == 1).all()

    def test_threshold_is_strict(self) -> None:
        probabilities = torch.tensor([[0.5, 0.3], [0.2, 0.25]]).reshape(2, 1, 2)  # (C, H, W); maxima 0.5, 0.3
        labels = labels_from_probabilities(probabilities, prob_thd=0.3, bg_index=7)
        assert labels.dtype == torch.int64
        assert labels.tolist() == [[0, 0]]  # 0.3 is not < 0.3
        labels = labels_from_probabilities(probabilities, prob_thd=0.31, bg_index=7)
        assert labels.tolist() == [[0, 7]]

    def test_postprocess_combines_both_halves(self) -> None:
        grid = torch.rand(2, 4, 5, 5)
        result = postprocess(grid, (11, 12), [0, 0, 1, 2], prob_thd=0.3, bg_index=2)
        torch.testing.assert_close(result.probabilities, class_probabilities(grid, (11, 12), [0, 0, 1, 2]))
        torch.testing.assert_close(result.labels, labels_from_probabilities(result.probabilities, 0.3, 2))
        assert result.labels.shape == (2, 11, 12)


class TestLabelsTorch:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("shape", [(1, 6, 33, 47), (7, 20, 21), (2, 300, 9, 11), (1, 5, 3), (2, 3, 4, 9, 11)])
    def test_same_rule_as_torch_argmax(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The element-wise class loop gives torch.argmax's labels: ties to the first class, the first NaN wins."""
        generator = torch.Generator().manual_seed(len(shape) * 100 + shape[-3])
        # few distinct values: many ties
        probabilities = (torch.randint(0, 4, shape, generator=generator).float() / 4).to(dtype)
        probabilities[..., -1, 0, 0] = 1.0  # the last class wins somewhere (299 with 300 classes: not a uint8)
        nan = torch.rand(shape, generator=generator) < 0.05
        for values in (probabilities, probabilities.masked_fill(nan, float("nan"))):
            for prob_thd, bg_index in ((0.0, 0), (0.5, shape[-3] - 1), (0.5, 300)):
                expected = values.argmax(dim=-3)
                expected[values.amax(dim=-3) < prob_thd] = bg_index
                labels = labels_from_probabilities(values, prob_thd, bg_index)
                assert labels.dtype == torch.int64
                torch.testing.assert_close(labels, expected, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_strided_views(self, dtype: torch.dtype) -> None:
        """A transposed and a sliced view give the labels of their contiguous copies."""
        generator = torch.Generator().manual_seed(3)
        base = (torch.randint(0, 5, (3, 13, 4, 17), generator=generator).float() / 5).to(dtype)
        for view in (base.permute(2, 0, 3, 1), base[:, :, 1:, ::2]):  # (4, 3, 17, 13); (3, 13, 3, 9)
            assert not view.is_contiguous()
            expected = view.argmax(dim=-3)
            expected[view.amax(dim=-3) < 0.3] = 2
            torch.testing.assert_close(labels_from_probabilities(view, 0.3, 2), expected, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_a_later_nan_never_replaces_an_earlier_one(self, dtype: torch.dtype) -> None:
        nan = float("nan")
        probabilities = torch.tensor([[0.1, nan, 0.5, nan], [nan, 0.2, 0.5, nan], [0.3, 0.9, nan, 0.1]], dtype=dtype)
        assert labels_from_probabilities(probabilities.view(3, 1, 4)).tolist() == [[1, 0, 2, 0]]


class TestLabelsNumpy:
    @pytest.mark.parametrize("num_classes", [1, 2, 7, 300])
    @pytest.mark.parametrize("strip_pixels", [None, 5 * 47, 1])  # whole; strips of 5 rows (the last of 3); rows
    def test_same_rule_as_numpy_argmax(self, num_classes: int, strip_pixels: int | None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        if strip_pixels is not None:
            monkeypatch.setattr(postprocess_module, "_STRIP_PIXELS", strip_pixels)
        generator = np.random.default_rng(num_classes)
        # few distinct values: many ties, which must go to the first class like np.argmax
        probabilities = generator.integers(0, 4, (num_classes, 33, 47)).astype(np.float32) / 4
        probabilities[:, 0, :3] = np.nan  # NaN wins, as in numpy
        probabilities[-1, 1, 0] = np.nan
        for prob_thd, bg_index in ((0.0, 0), (0.5, min(num_classes - 1, 254))):
            expected = probabilities.argmax(axis=0).astype(np.uint8)
            expected[probabilities.max(axis=0) < prob_thd] = bg_index
            labels = labels_from_probabilities_np(probabilities, prob_thd, bg_index)
            assert labels.dtype == np.uint8
            np.testing.assert_array_equal(labels, expected)
            without_nan = np.nan_to_num(probabilities)
            expected = without_nan.argmax(axis=0).astype(np.uint8)
            expected[without_nan.max(axis=0) < prob_thd] = bg_index
            np.testing.assert_array_equal(labels_from_probabilities_np(without_nan, prob_thd, bg_index), expected)
