"""Tests for the decoupled method of coninfer.solver (``joint=False``): golden parity (section F, both readings),
its rules against the joint solver, and the tile step's dispatch. Chunked, reduce and gather tests of both
methods are in test_solver.py (TestChunked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coninfer.settings import InferenceSettings
from coninfer.solver import SolverSettings, SolverState, assign, refine, refine_with_history
from coninfer.tile_step import solve
from test_solver import golden_inputs, random_problem

# README section F, "Recommended tolerances"
Z_ATOL, MEANS_ATOL, VARIANCE_RTOL, LOSS_ATOL = 2e-4, 1e-5, 1e-4, 1e-4


def _decoupled_cases(golden_dir: Path) -> list[Path]:
    cases = sorted(golden_dir.glob("decoupled_case*.npz"))
    assert cases, f"no decoupled_case*.npz in {golden_dir}"
    return cases


def _fragile_rows(golden: np.ndarray, archive: np.lib.npyio.NpzFile) -> np.ndarray:
    """(N,) bool: rows whose two largest golden values differ by less than the fixture's ``fragile_eps`` (its
    own rule for z, applied to q, which stores no fragile rows; reading (a)'s collapsed q is near-uniform)."""
    eps = json.loads(str(archive["meta_json"]))["fragile_eps"]
    top2 = np.sort(golden, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] < eps


def _assert_soft(actual: np.ndarray, golden: np.ndarray, fragile: np.ndarray, what: str) -> None:
    """Max abs error within Z_ATOL, and the same argmax on every row outside ``fragile`` (N,) bool."""
    error = float(np.abs(actual - golden).max())
    assert error <= Z_ATOL, f"{what}: max abs error {error:.3g}"
    keep = ~fragile
    np.testing.assert_array_equal(actual.argmax(axis=1)[keep], golden.argmax(axis=1)[keep], err_msg=what)


def _free_posterior(logits: np.ndarray, features: np.ndarray, means, variance, settings) -> np.ndarray:
    """q (N, K) of the prior-free E-step with the given state."""
    state = SolverState(torch.as_tensor(means), torch.as_tensor(variance))
    return assign(torch.from_numpy(logits), torch.from_numpy(features), state, settings, prior=False).numpy()


class TestGolden:
    def test_reading_a_matches(self, golden_dir: Path) -> None:
        """free_temperature=None: the prior-free E-steps use temperature; every stored intermediate."""
        for path in _decoupled_cases(golden_dir):
            with np.load(path, allow_pickle=False) as archive:
                logits, features, temperature = golden_inputs(archive)
                settings = SolverSettings(temperature=temperature, free_temperature=None)
                result = refine_with_history(logits, features, settings, joint=False)
                history, name = result.fit.history, path.name
                fragile = archive["fragile_rows"]
                _assert_soft(result.z, archive["z"], fragile, f"{name} z")
                _assert_soft(result.q, archive["q_final"], _fragile_rows(archive["q_final"], archive), f"{name} q_final")
                np.testing.assert_allclose(history.means.numpy(), archive["mu_iter"], rtol=0, atol=MEANS_ATOL,
                                           err_msg=name)
                np.testing.assert_allclose(history.variance.numpy(), archive["std_iter"], rtol=VARIANCE_RTOL,
                                           err_msg=name)
                assert abs(float(history.loss[-1]) - float(archive["loss_final"])) <= LOSS_ATOL, name
                steps = {"q_first": [0], "q_iter": range(history.means.shape[0])}
                for key in sorted(set(steps) & set(archive.files)):
                    for step in steps[key]:
                        golden = archive[key] if key == "q_first" else archive[key][step]
                        q = _free_posterior(logits, features, history.means[step], history.variance[step], settings)
                        assert np.abs(q - golden).max() <= Z_ATOL, (name, key, step)
                np.testing.assert_array_equal(refine(logits, features, settings, joint=False), result.z)

    def test_reading_b_matches(self, golden_dir: Path) -> None:
        """The default free_temperature (1.0, a plain EM posterior) against the ``em1_*`` arrays."""
        assert SolverSettings().free_temperature == 1.0
        for path in _decoupled_cases(golden_dir):
            with np.load(path, allow_pickle=False) as archive:
                logits, features, temperature = golden_inputs(archive)
                result = refine_with_history(logits, features, SolverSettings(temperature=temperature), joint=False)
                state, name = result.fit.state, path.name
                fragile = archive["em1_fragile_rows"]
                _assert_soft(result.z, archive["em1_z"], fragile, f"{name} em1_z")
                _assert_soft(result.q, archive["em1_q_final"], _fragile_rows(archive["em1_q_final"], archive),
                             f"{name} em1_q_final")
                np.testing.assert_allclose(state.means.numpy(), archive["em1_mu_final"], rtol=0, atol=MEANS_ATOL,
                                           err_msg=name)
                np.testing.assert_allclose(state.variance.numpy(), archive["em1_std_final"], rtol=VARIANCE_RTOL,
                                           err_msg=name)
                loss = float(result.fit.history.loss[-1])
                assert abs(loss - float(archive["em1_loss_final"])) <= LOSS_ATOL, name


class TestRules:
    def test_no_iterations_is_the_joint_first_e_step(self) -> None:
        """Same initialisation, and the fusion is the joint E-step: with 0 M-steps both methods agree."""
        logits, features = random_problem(800, 5, 24, seed=7)
        np.testing.assert_array_equal(refine(logits, features, iterations=0, joint=False),
                                      refine(logits, features, iterations=0))
        assert np.abs(refine(logits, features, iterations=3, joint=False) - refine(logits, features, iterations=3)
                      ).max() > 1e-3

    def test_fit_ignores_the_prior_after_initialisation(self) -> None:
        """Logits that keep the top-k patches of every query give the same prior-free means."""
        logits, features = random_problem(800, 5, 24, seed=8)
        settings = SolverSettings(iterations=4)
        first = refine_with_history(logits, features, settings, joint=False)
        log_prior = 100.0 * logits - np.log(np.exp(100.0 * logits).sum(axis=1, keepdims=True))  # (N, K)
        rows = np.ones(800, dtype=bool)
        rows[np.argsort(-log_prior, axis=0)[: 2 * settings.init_topk].ravel()] = False  # far from every top-k
        changed = logits.copy()
        changed[rows] = changed[rows].mean(axis=1, keepdims=True)  # a flat prior, below every top-k patch's
        second = refine_with_history(changed, features, settings, joint=False)
        torch.testing.assert_close(second.fit.history.means[0], first.fit.history.means[0], rtol=0, atol=1e-7)
        torch.testing.assert_close(second.fit.state.means, first.fit.state.means, rtol=0, atol=1e-6)
        np.testing.assert_allclose(second.q, first.q, rtol=0, atol=1e-6)
        assert np.abs(second.z - first.z).max() > 1e-2  # the fusion does see the new prior

    def test_fusion_is_prior_times_likelihood(self) -> None:
        """z ~ P * exp(ll~ / temperature) = P * q^(t_free / temperature), row-normalised."""
        logits, features = random_problem(600, 4, 16, seed=9)
        settings = SolverSettings(temperature=20.0, free_temperature=2.0, iterations=3)
        result = refine_with_history(logits, features, settings, joint=False)
        scores = 100.0 * logits.astype(np.float64)
        prior = np.exp(scores - scores.max(axis=1, keepdims=True))
        fused = prior * result.q.astype(np.float64) ** (2.0 / 20.0)
        np.testing.assert_allclose(result.z, fused / fused.sum(axis=1, keepdims=True), rtol=0, atol=1e-5)

    def test_free_temperature_none_uses_temperature(self) -> None:
        logits, features = random_problem(600, 4, 16, seed=10)
        unset = refine(logits, features, temperature=30.0, free_temperature=None, joint=False)
        np.testing.assert_array_equal(unset, refine(logits, features, temperature=30.0, free_temperature=30.0,
                                                    joint=False))
        assert np.abs(unset - refine(logits, features, temperature=30.0, joint=False)).max() > 1e-3

    def test_prior_free_posterior_is_accurate_at_temperature_one(self) -> None:
        """At t_free = 1, q is 50x more sensitive to rounding in ll than z; float32 ll errs by ~1e-5 here."""
        logits, features = random_problem(2000, 6, 1024, seed=13)
        rng = np.random.default_rng(13)
        means = features[rng.choice(2000, 6, replace=False)] + 0.05 * rng.normal(size=(6, 1024)).astype(np.float32)
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        variance = (rng.uniform(0.5, 1.5, 1024) / 1024).astype(np.float32)
        q = _free_posterior(logits, features, means, variance, SolverSettings(free_temperature=1.0))
        distances = ((features.astype(np.float64)[:, None] - means[None]) ** 2 / variance).sum(axis=2)  # (N, K)
        log_q = -0.5 * (distances - distances.min(axis=1, keepdims=True))
        expected = np.exp(log_q) / np.exp(log_q).sum(axis=1, keepdims=True)
        assert 0.01 < expected.max(axis=1).mean() < 0.99  # soft rows, where rounding shows
        np.testing.assert_allclose(q, expected, rtol=0, atol=1e-6)

    def test_joint_history_has_no_q(self) -> None:
        logits, features = random_problem(300, 3, 16, seed=11)
        assert refine_with_history(logits, features, SolverSettings(iterations=2)).q is None
        q = refine_with_history(logits, features, SolverSettings(iterations=2), joint=False).q
        np.testing.assert_allclose(q.sum(axis=1), 1, atol=1e-6)


class TestTileStep:
    @pytest.mark.parametrize(("method", "joint"), [("coninfer", True), ("decoupled", False)])
    def test_solve_dispatches_the_method(self, method: str, joint: bool) -> None:
        logits, features = random_problem(500, 4, 16, seed=12)
        settings = InferenceSettings(method=method, solver=SolverSettings(iterations=3))
        z = solve(torch.from_numpy(logits), torch.from_numpy(features), settings)
        expected = refine(torch.from_numpy(logits), torch.from_numpy(features), iterations=3, joint=joint)
        torch.testing.assert_close(z, expected, rtol=0, atol=0)
