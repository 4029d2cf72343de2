"""Tests for coninfer.solver: golden parity (section A), chunked == in-memory, dtypes, guards, validation.

The chunked and multi-process tests run both methods (joint and decoupled); golden F and the decoupled
method's own rules are in test_solver_decoupled.py, which imports the helpers below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from coninfer.errors import InputError
from coninfer.solver import (
    SolverSettings,
    assign_chunks,
    fit_context,
    refine,
    refine_chunked,
    refine_with_history,
)


def golden_inputs(archive: np.lib.npyio.NpzFile) -> tuple[np.ndarray, np.ndarray, float]:
    """(logits (N, K), features (N, D), temperature) exactly as the README builds them."""
    features = (archive["feat_A"].astype(np.float32) @ archive["feat_W"].astype(np.float32)) / archive["feat_norms"][:, None]
    return archive["clip_logits"], features, float(archive["temp"])


def _gmm_cases(golden_dir: Path) -> list[Path]:
    cases = sorted(golden_dir.glob("gmm_case*.npz"))
    assert cases, f"no gmm_case*.npz in {golden_dir}"
    return cases


def random_problem(num_patches: int, num_queries: int, num_features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit features and noisy cosine-like logits that favour the true cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_queries, num_features))
    labels = rng.integers(0, num_queries, num_patches)
    features = centres[labels] + 0.8 * rng.normal(size=(num_patches, num_features))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    logits = 0.2 + 0.02 * rng.normal(size=(num_patches, num_queries))
    logits[np.arange(num_patches), labels] += 0.02
    return logits.astype(np.float32), features.astype(np.float32)


def chunk_source(logits: np.ndarray, features: np.ndarray, bounds: list[int], dtype: torch.dtype = torch.float32):
    """A re-iterable chunk source over rows ``bounds[j]:bounds[j + 1]``."""

    def chunks():
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield torch.from_numpy(logits[start:stop]), torch.from_numpy(features[start:stop]).to(dtype)

    return chunks


class TestGolden:
    def test_every_case_matches_official(self, golden_dir: Path) -> None:
        for path in _gmm_cases(golden_dir):
            with np.load(path, allow_pickle=False) as archive:
                logits, features, temperature = golden_inputs(archive)
                result = refine_with_history(logits, features, SolverSettings(temperature=temperature))
                history = result.fit.history
                z_golden = archive["z"]
                assert np.abs(result.z - z_golden).max() <= 2e-4, path.name
                np.testing.assert_array_equal(result.z.argmax(axis=1), z_golden.argmax(axis=1), err_msg=path.name)
                np.testing.assert_allclose(history.means.numpy(), archive["mu_iter"], rtol=0, atol=1e-5, err_msg=path.name)
                np.testing.assert_allclose(history.variance.numpy(), archive["std_iter"], rtol=1e-4, err_msg=path.name)
                np.testing.assert_allclose(history.loss.numpy(), archive["loss_iter"], rtol=0, atol=1e-4, err_msg=path.name)
                np.testing.assert_allclose(result.fit.state.means.numpy(), archive["mu_final"], atol=1e-5)
                np.testing.assert_allclose(result.fit.state.variance.numpy(), archive["std_final"], rtol=1e-4)
                # The plain entry point runs the same code: bit-identical z.
                np.testing.assert_array_equal(refine(logits, features, temperature=temperature), result.z)

    def test_intermediate_z_per_iteration_count(self, golden_dir: Path) -> None:
        """refine(iterations=t) is the official z after E-step t (cases that store z_iter)."""
        checked = 0
        for path in _gmm_cases(golden_dir):
            with np.load(path, allow_pickle=False) as archive:
                if "z_iter" not in archive.files:
                    continue
                logits, features, temperature = golden_inputs(archive)
                for step in (0, 1, 4):
                    z = refine(logits, features, temperature=temperature, iterations=step)
                    assert np.abs(z - archive["z_iter"][step]).max() <= 2e-4, (path.name, step)
                checked += 1
        assert checked, "no golden case stores z_iter"


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "decoupled"])
class TestChunked:
    def test_chunked_equals_in_memory(self, joint: bool) -> None:
        logits, features = random_problem(3000, 6, 48, seed=1)
        settings = SolverSettings(iterations=6, block_rows=256)
        expected = refine(logits, features, iterations=6, joint=joint)
        bounds = [0, 700, 701, 701, 2048, 3000]  # uneven, with a one-row and an empty chunk
        half_chunks = chunk_source(logits, features, bounds, torch.float16)
        fit = fit_context(half_chunks, settings, joint=joint)
        assert fit.num_patches == 3000
        z = torch.cat(list(assign_chunks(half_chunks, fit.state, settings))).numpy()
        assert np.abs(z - refine(logits, features.astype(np.float16), iterations=6, joint=joint)).max() <= 1e-5
        chunks32 = chunk_source(logits, features, bounds)
        out = np.zeros((3000, 6), dtype=np.float32)
        refine_chunked(chunks32, out, settings, joint=joint)
        assert np.abs(out - expected).max() <= 1e-5
        np.testing.assert_array_equal(out.argmax(axis=1), expected.argmax(axis=1))
        out_tensor = torch.zeros(3000, 6)
        refine_chunked(chunks32, out_tensor, settings, joint=joint)
        np.testing.assert_array_equal(out_tensor.numpy(), out)

    def test_reduce_applies_to_every_sum(self, joint: bool) -> None:
        """Two identical 'processes': summed statistics double, the M-step is scale-free, z is unchanged."""
        logits, features = random_problem(500, 4, 16, seed=2)
        calls = []

        def twice(tensor: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(tensor.shape))
            return tensor * 2

        def chunks():
            yield torch.from_numpy(logits), torch.from_numpy(features)

        settings = SolverSettings(iterations=3)
        fit = fit_context(chunks, settings, joint=joint, reduce=twice)
        assert sorted(set(calls)) == [(4,), (4, 16), (16,)]
        z = next(iter(assign_chunks(chunks, fit.state, settings))).numpy()
        assert np.abs(z - refine(logits, features, iterations=3, joint=joint)).max() <= 1e-6

    def test_two_processes_fit_the_single_process_mixture(self, joint: bool) -> None:
        """Two threads stand in for two processes: all-reduce via ``reduce``, all-gather via ``gather``."""
        logits, features = random_problem(1200, 5, 24, seed=6)
        split = 500
        # each share's local top-k patches differ from the global ones, so a missing gather changes the result
        shares = [(0, split), (split, 1200)]
        settings = SolverSettings(iterations=4, block_rows=128)
        barrier = threading.Barrier(2)
        slots: list = [None, None]
        results: list = [None, None]

        def exchange(rank: int, value):
            barrier.wait()
            slots[rank] = value
            barrier.wait()
            both = list(slots)
            barrier.wait()
            return both

        def worker(rank: int) -> None:
            start, stop = shares[rank]

            def chunks():
                yield torch.from_numpy(logits[start:stop]), torch.from_numpy(features[start:stop])

            def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
                first, second = exchange(rank, tensor)
                return first + second

            def all_gather(candidates):
                local = type(candidates)(candidates.log_prior, candidates.index + start, candidates.features)
                first, second = exchange(rank, local)
                return first.merge(second, settings.init_topk)

            fit = fit_context(chunks, settings, joint=joint, reduce=all_reduce, gather=all_gather, record_history=True)
            results[rank] = (fit, next(iter(assign_chunks(chunks, fit.state, settings))))

        threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        single = refine_with_history(logits, features, settings, joint=joint)
        z = torch.cat([results[0][1], results[1][1]]).numpy()
        assert np.abs(z - single.z).max() <= 1e-5
        for fit, _ in results:
            torch.testing.assert_close(fit.history.means, single.fit.history.means, rtol=0, atol=1e-6)
            torch.testing.assert_close(fit.history.loss, single.fit.history.loss, rtol=0, atol=1e-6)

    def test_source_must_repeat_itself(self, joint: bool) -> None:
        logits, features = random_problem(100, 3, 8)
        passes = []

        def shrinking():
            passes.append(1)
            rows = 100 - len(passes)
            yield torch.from_numpy(logits[:rows]), torch.from_numpy(features[:rows])

        with pytest.raises(InputError, match="first pass"):
            fit_context(shrinking, SolverSettings(iterations=2), joint=joint)

    def test_chunks_must_agree_on_sizes(self, joint: bool) -> None:
        logits, features = random_problem(100, 3, 8)

        def mixed():
            yield torch.from_numpy(logits[:50]), torch.from_numpy(features[:50])
            yield torch.from_numpy(logits[50:]), torch.from_numpy(features[50:, :4])

        with pytest.raises(InputError, match="chunk 1"):
            fit_context(mixed, SolverSettings(iterations=1), joint=joint)


class TestDtypes:
    def test_numpy_in_numpy_out_torch_in_torch_out(self) -> None:
        logits, features = random_problem(400, 5, 32)
        z_numpy = refine(logits, features, iterations=3)
        z_torch = refine(torch.from_numpy(logits), torch.from_numpy(features), iterations=3)
        assert isinstance(z_numpy, np.ndarray) and z_numpy.dtype == np.float32 and z_numpy.shape == (400, 5)
        assert isinstance(z_torch, torch.Tensor) and z_torch.dtype == torch.float32 and z_torch.device.type == "cpu"
        np.testing.assert_array_equal(z_torch.numpy(), z_numpy)
        np.testing.assert_allclose(z_numpy.sum(axis=1), 1, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_features_accumulate_in_float32(self, dtype: torch.dtype) -> None:
        logits, features = random_problem(400, 5, 32)
        half = torch.from_numpy(features).to(dtype)
        z = refine(torch.from_numpy(logits), half, iterations=3)
        expected = refine(torch.from_numpy(logits), half.float(), iterations=3)
        assert z.dtype == torch.float32
        assert (z - expected).abs().max() <= 1e-6

    def test_numpy_float16_and_read_only_arrays(self) -> None:
        logits, features = random_problem(200, 3, 16)
        half = features.astype(np.float16)
        half.flags.writeable = False
        z = refine(logits, half, iterations=2)
        np.testing.assert_allclose(z, refine(logits, half.astype(np.float32), iterations=2), atol=1e-6)

    def test_deterministic(self) -> None:
        logits, features = random_problem(1000, 4, 24, seed=3)
        np.testing.assert_array_equal(refine(logits, features), refine(logits, features))


class TestGuards:
    def test_dead_query_keeps_previous_mean(self) -> None:
        """Query 2's prior underflows everywhere (exp(-110) == 0 in float32): official code gives NaN."""
        logits, features = random_problem(300, 3, 16, seed=4)
        logits[:, 2] = -0.6
        logits[:, :2] = 0.5 + 0.01 * logits[:, :2]
        result = refine_with_history(logits, features, SolverSettings(iterations=4))
        assert np.isfinite(result.z).all()
        assert (result.z[:, 2] == 0).all()  # so sum_i z[i, 2] == 0 at every M-step
        means = result.fit.history.means
        assert torch.isfinite(means).all() and torch.isfinite(result.fit.history.variance).all()
        for step in range(1, means.shape[0]):
            torch.testing.assert_close(means[step, 2], means[0, 2], rtol=0, atol=0)
        assert not torch.equal(means[4, 0], means[0, 0])  # the living queries moved

    def test_topk_ties_take_lowest_patch_index(self) -> None:
        rng = np.random.default_rng(5)
        features = rng.normal(size=(40, 8)).astype(np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        logits = np.full((40, 2), 0.1, dtype=np.float32)
        tied = [7, 12, 20, 33]
        logits[tied, 0] = 0.3  # four equal best patches for query 0, init_topk = 2
        logits[3, 1] = 0.3
        settings = SolverSettings(iterations=0, init_topk=2)
        expected = features[7] + features[12]
        expected /= np.linalg.norm(expected)
        for bounds in ([0, 40], [0, 10, 15, 40], [0, 13, 40]):  # ties inside one chunk and across chunks

            chunks = chunk_source(logits, features, bounds)
            fit = fit_context(chunks, settings, record_history=True)
            np.testing.assert_allclose(fit.history.means[0, 0].numpy(), expected, atol=1e-6, err_msg=str(bounds))

    def test_no_patch_by_query_by_dim_temporary(self, tmp_path: Path) -> None:
        """An (N, K, D) float32 temporary would need 8.6 GB here; peak RSS may grow by 200 MB at most."""
        script = textwrap.dedent(
            """
            import json, resource, time, torch
            from coninfer.solver import refine
            torch.manual_seed(0)
            n, k, d = 65536, 32, 1024
            features = torch.empty(n, d)
            features.normal_()
            features.div_(torch.linalg.vector_norm(features, dim=1, keepdim=True))
            logits = torch.rand(n, k).mul_(0.3)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            z = refine(logits, features, iterations=1)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"growth_kb": after - before, "seconds": seconds, "shape": list(z.shape)}))
            """
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["shape"] == [65536, 32]
        assert report["growth_kb"] < 200 * 1024, report


class TestValidation:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda lg, ft: (lg[:, 0], ft), "logits must be 2-D"),
            (lambda lg, ft: (lg, ft[:, :, None]), "features must be 2-D"),
            (lambda lg, ft: (lg[:-1], ft), "rows"),
            (lambda lg, ft: (lg[:, :1], ft), "K >= 2"),
            (lambda lg, ft: (lg[:5], ft[:5]), "init_topk"),
            (lambda lg, ft: (np.where(np.arange(lg.size).reshape(lg.shape) == 7, np.nan, lg).astype(np.float32), ft), "logits contain NaN"),
            (lambda lg, ft: (lg, np.where(np.arange(ft.size).reshape(ft.shape) == 900, np.inf, ft).astype(np.float32)), "NaN or infinite"),
            (lambda lg, ft: (lg, ft.astype(np.int32)), "float"),
            (lambda lg, ft: (lg, torch.from_numpy(ft)), "both as numpy"),
            (lambda lg, ft: (lg[:0], ft[:0]), "no rows"),
            (lambda lg, ft: (lg, ft[:, :0]), "features has 0 columns"),
            (lambda lg, ft: (lg * np.float32(1e38), ft), "prior_scale"),  # finite, but x100 overflows
        ],
    )
    def test_bad_arrays(self, change, message: str) -> None:
        logits, features = random_problem(60, 3, 16)
        bad_logits, bad_features = change(logits, features)
        with pytest.raises(InputError, match=message):
            refine(bad_logits, bad_features, iterations=2)

    def test_nan_features_caught_without_iterations(self) -> None:
        logits, features = random_problem(60, 3, 16)
        features[50, 3] = np.nan  # not among the top patches, and no M-step to see it
        with pytest.raises(InputError, match="NaN or infinite"):
            refine(logits, features, iterations=0)

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"temperature": 0.0}, "temperature"),
            ({"temperature": float("nan")}, "temperature"),
            ({"prior_scale": -1.0}, "prior_scale"),
            ({"iterations": -1}, "iterations"),
            ({"iterations": 2.5}, "iterations"),
            ({"init_topk": 0}, "init_topk"),
        ],
    )
    def test_bad_settings(self, settings: dict, message: str) -> None:
        logits, features = random_problem(60, 3, 16)
        with pytest.raises(InputError, match=message.replace("_", "[_-]")):
            refine(logits, features, **settings)

    def test_block_rows_validated(self) -> None:
        with pytest.raises(InputError, match="block_rows"):
            SolverSettings(block_rows=0)


class TestInputForms:
    """Array forms a user hands over without thinking: views, foreign byte order, numpy scalars, autograd."""

    def test_reversed_view_is_accepted(self) -> None:
        logits, features = random_problem(200, 3, 16)
        z = refine(logits[::-1], features[::-1], iterations=2)  # negative strides: torch.from_numpy refuses them
        np.testing.assert_array_equal(z, refine(logits[::-1].copy(), features[::-1].copy(), iterations=2))

    def test_big_endian_arrays_are_accepted(self) -> None:
        logits, features = random_problem(200, 3, 16)
        z = refine(logits.astype(">f4"), features.astype(">f2"), iterations=2)
        np.testing.assert_array_equal(z, refine(logits, features.astype(np.float16), iterations=2))

    def test_numpy_scalar_settings(self) -> None:
        """``temperature=archive["temp"]``-style numpy scalars work like Python numbers."""
        logits, features = random_problem(200, 3, 16)
        z = refine(logits, features, temperature=np.float32(150), prior_scale=np.float16(100), iterations=np.int64(2))
        np.testing.assert_array_equal(z, refine(logits, features, temperature=150.0, iterations=2))
        settings = SolverSettings(temperature=np.float32(150), init_topk=np.int32(4))
        assert type(settings.temperature) is float and type(settings.init_topk) is int

    def test_no_autograd_graph(self) -> None:
        """Inputs that require grad must not make the solver record 11 iterations of autograd history."""
        logits, features = random_problem(200, 3, 16)
        z = refine(torch.from_numpy(logits).requires_grad_(), torch.from_numpy(features).requires_grad_())
        assert not z.requires_grad and z.grad_fn is None

    def test_all_equal_logits_give_uniform_z(self) -> None:
        _, features = random_problem(60, 4, 16)
        z = refine(np.full((60, 4), 0.2, dtype=np.float32), features)
        np.testing.assert_allclose(z, 0.25, rtol=0, atol=1e-7)
