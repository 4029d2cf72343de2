"""The ConInfer context solver: a Gaussian mixture over patch features, steered by a per-patch prior.

Two methods share one code path: the *joint* solver (ConInfer; ``joint=True``, the default) and the
*decoupled* one (paper Table 4, "no joint learning"; ``joint=False``, golden README section F).

Maths (golden README, sections A and F; i = patch, k = query, d = feature dimension):

1. ``log P = log_softmax(prior_scale * L)`` over k, fixed for the whole run.
2. Initial mean of query k: the ``init_topk`` patches with the largest ``P[:, k]`` (ranked by log P, which
   has the same order without float32 underflow ties; remaining ties: lowest patch index first),
   ``mu_k = normalise(sum_i P[i, k] F[i])``; one shared diagonal variance ``v = 1/D``.
3. ``iterations + 1`` E-steps ``z[i] = softmax_k(log P[i] + ll[i] / temperature)`` with
   ``ll[i, k] = -0.5 * sum_d (F[i, d] - mu[k, d])^2 / v[d]``, and ``iterations`` M-steps between them:
   ``mu_k = normalise(sum_i z[i, k] F[i])``, ``v_d = sum_ik z[i, k] (F[i, d] - mu[k, d])^2 / sum_ik z[i, k]``.
4. Decoupled: steps 1-2 alike, but the E-steps that feed the M-steps leave the prior out,
   ``q[i] = softmax_k(ll[i] / t_free)`` (``t_free = free_temperature``, or ``temperature`` when it is None), and
   the M-steps use q in place of z. The prior enters once, at the end: ``z = softmax_k(log P + ll / temperature)``
   with the last likelihood, i.e. ``z ~ P * exp(ll~ / temperature)``: the joint solver's final E-step.

How it is computed, so that memory stays ``O(N*K + K*D)`` and features may stream from disk in chunks:

* ``ll`` is expanded as ``F @ (mu / v)^T - 0.5 * sum_d mu^2 / v`` plus ``-0.5 * F^2 @ (1/v)``; the last term is
  the same for every k of a patch, so it cancels in the softmax and is never computed. No (N, K, D) tensor.
* ``P * exp(ll~ / T) / sum(...)`` is evaluated as one softmax of ``log P + ll / T``: the same numbers, but it
  cannot give 0/0 when P underflows.
* An M-step needs only sums over patches: ``sum_i z[i, k]`` (K), ``z^T F`` (K, D) and ``sum_i F[i]^2`` (D; since
  every row of z (or q) sums to one, ``sum_ik z[i, k] F[i, d]^2 = sum_i F[i, d]^2``). Then
  ``sum_ik z (F - mu)^2 = sum_i F^2 - 2 sum_k mu_k (z^T F)_k + sum_k (sum_i z[i, k]) mu_k^2`` per dimension.
  Each chunk is processed in row blocks of ``block_rows`` in float32 (float16/bfloat16 features are cast per
  block); the sums across blocks and chunks are kept in float64.
* Init means use relative weights ``exp(log P - max log P)``: scale-free, so identical after normalisation.

Deviations from the official code, all in cases where it returns NaN: a query whose responsibilities all
underflow to zero (``sum_i z[i, k] == 0``) keeps its previous mean; a zero-variance dimension is floored at the
smallest normal float32. Top-k ties are broken by the lowest patch index (the official ``topk`` leaves them
unspecified).

Entry points: :func:`refine` (arrays in memory), :func:`fit_context` + :func:`assign_chunks` (a callable that
returns a fresh iterator of ``(logits_chunk, features_chunk)`` each time it is called; it is called
``iterations + 2`` times), :func:`refine_chunked` (the same, writing z into an output array). The chunked entry
points take ``reduce`` and ``gather`` hooks so that several processes can fit one mixture over their shares.
The streamed building blocks live in :mod:`coninfer.solver_core`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coninfer.errors import InputError
from coninfer.settings import SolverSettings
from coninfer.solver_core import (
    Chunk,
    ChunkSource,
    Gather,
    Likelihood,
    Reduce,
    SolverState,
    TopKCandidates,
    check_chunk,
    expectation_pass,
    free_e_step_t,
    fused_e_step_t,
    initial_pass,
    initial_state,
    likelihood_dtype,
    m_step,
    no_gather,
    no_reduce,
    prior_log_t,
    row_blocks,
)

__all__ = [
    "prior_probabilities",
    "ChunkSource",
    "RefineResult",
    "SolverFit",
    "SolverHistory",
    "SolverSettings",
    "SolverState",
    "TopKCandidates",
    "assign",
    "assign_chunks",
    "fit_context",
    "refine",
    "refine_chunked",
    "refine_with_history",
]


@dataclass(frozen=True)
class SolverHistory:
    """What E-step t used and measured: ``means`` (T+1, K, D), ``variance`` (T+1, D), ``loss`` (T+1,) float64.

    ``loss[t]`` is the official monitoring loss KL(z||P) + KL(z||q), q = softmax(ll / 50), averaged over patches,
    of the prior-fused z made from state t (decoupled: the fusion made from state t; ``loss[-1]`` is the loss of
    the returned fusion).
    """

    means: torch.Tensor
    variance: torch.Tensor
    loss: torch.Tensor


@dataclass(frozen=True)
class SolverFit:
    """Result of :func:`fit_context`: the final ``state`` (used by the last E-step) and optional history."""

    state: SolverState
    num_patches: int
    history: SolverHistory | None = None


def _initial_fit_state(chunks: ChunkSource, settings: SolverSettings, gather: Gather):
    """The initial state (top-k means, variance 1/D) and the chunk walk that found it."""
    candidates, walk = initial_pass(chunks, settings)
    candidates = gather(candidates)
    if candidates.index.shape[0] < settings.init_topk:
        raise InputError(
            f"only {candidates.index.shape[0]} patches but init_topk={settings.init_topk}",
            hint="give at least init_topk patches or lower init_topk",
        )
    return initial_state(candidates, candidates.features.shape[2]), walk


@torch.no_grad()  # inputs that require grad must not record every iteration's autograd history
def fit_context(
    chunks: ChunkSource,
    settings: SolverSettings = SolverSettings(),
    *,
    joint: bool = True,
    reduce: Reduce = no_reduce,
    gather: Gather = no_gather,
    record_history: bool = False,
) -> SolverFit:
    """Fit the mixture over all chunks; returns the state that the final E-step (:func:`assign`) uses.

    ``joint=False`` fits the decoupled method's prior-free mixture (M-steps on q, not z); its fusion with the
    prior is the same final E-step, so :func:`assign` / :func:`assign_chunks` serve both methods.

    ``chunks()`` must return a fresh iterator of ``(logits (n, K), features (n, D))`` tensors, the same data in
    the same order every time; it is called ``iterations + 1`` times (``iterations + 2`` with
    ``record_history``).

    Several processes, each with its own share of the patches, fit one mixture with two hooks: ``reduce`` is
    applied to every summed statistic before it is used (an all-reduce sum), and ``gather`` to this process's
    top-k candidates before the initial means are formed (an all-gather folded with :meth:`TopKCandidates.merge`;
    add the process's first global patch index to ``index`` so ties break as in one process). Without
    ``gather``, every process would start from its own local top-k patches.
    """
    state, walk = _initial_fit_state(chunks, settings, gather)
    num_patches = walk.num_patches
    if record_history:  # the loss is averaged over the patches of all processes
        num_patches = float(reduce(torch.tensor(float(walk.num_patches), dtype=torch.float64)))
    square_sum: torch.Tensor | None = None
    means, variances, losses = [], [], []
    for step in range(settings.iterations + int(record_history)):
        statistics = step < settings.iterations
        sums = expectation_pass(walk, state, settings, joint=joint, statistics=statistics,
                                squares=square_sum is None and statistics, loss=record_history)
        if record_history:
            means.append(state.means)
            variances.append(state.variance)
            losses.append(reduce(sums["loss"]).cpu() / num_patches)
        if statistics:
            device = state.means.device
            square_sum = reduce(sums["square_sum"]).to(device) if square_sum is None else square_sum
            weight = reduce(sums["weight"]).to(device)
            state = m_step(weight, reduce(sums["weighted_features"]).to(device), square_sum, state)
    history = None
    if record_history:
        history = SolverHistory(torch.stack(means), torch.stack(variances), torch.stack(losses))
    return SolverFit(state, walk.num_patches, history)


@torch.no_grad()
def assign(
    logits: torch.Tensor, features: torch.Tensor, state: SolverState, settings: SolverSettings, *, prior: bool = True
) -> torch.Tensor:
    """Final soft assignment z (n, K) float32 for one chunk, on the features' device.

    z is the prior-fused E-step, for both methods (the decoupled method's fusion). ``prior=False`` returns the
    decoupled fit's prior-free posterior ``q = softmax_k(ll / t_free)`` instead (logits checked, not used).
    """
    logits, features = check_chunk(logits, features, -1)
    if (logits.shape[1], features.shape[1]) != tuple(state.means.shape):
        raise InputError(
            f"chunk has K={logits.shape[1]}, D={features.shape[1]} but the state has (K, D) = {tuple(state.means.shape)}",
            hint="assign chunks with the queries and features the state was fitted on",
        )
    if logits.shape[0] == 0:
        return torch.empty(0, logits.shape[1], dtype=torch.float32, device=features.device)
    likelihood = Likelihood.from_state(state, features.device, likelihood_dtype(prior))
    parts = [
        fused_e_step_t(prior_log_t(block_logits, settings), likelihood(block), settings.temperature)
        if prior
        else free_e_step_t(likelihood(block), settings)
        for block_logits, block in row_blocks(logits, features, settings)
    ]
    z = torch.cat(parts, dim=1).T.to(torch.float32).contiguous()  # (K, n) -> (n, K)
    if not bool(torch.isfinite(z).all()):
        raise InputError("features contain NaN or infinite values", hint="check the feature extractor output")
    return z


def assign_chunks(
    chunks: ChunkSource, state: SolverState, settings: SolverSettings, *, prior: bool = True
) -> Iterator[torch.Tensor]:
    """Yield z (n, K) float32 (q with ``prior=False``, see :func:`assign`) for every chunk of ``chunks()``."""
    for logits, features in chunks():
        yield assign(logits, features, state, settings, prior=prior)


def refine_chunked(
    chunks: ChunkSource,
    out: np.ndarray | torch.Tensor,
    settings: SolverSettings = SolverSettings(),
    *,
    joint: bool = True,
    reduce: Reduce = no_reduce,
    gather: Gather = no_gather,
) -> SolverFit:
    """Fit over ``chunks`` and write z into ``out`` (N, K) (numpy array, memmap or tensor), chunk after chunk.
    ``joint``, ``reduce`` and ``gather``: see :func:`fit_context`."""
    fit = fit_context(chunks, settings, joint=joint, reduce=reduce, gather=gather)
    expected = (fit.num_patches, fit.state.means.shape[0])
    if tuple(out.shape) != expected:
        raise InputError(f"out has shape {tuple(out.shape)}, expected {expected}", hint="allocate out as (N, K)")
    start = 0
    for z in assign_chunks(chunks, fit.state, settings):
        stop = start + z.shape[0]
        if isinstance(out, torch.Tensor):
            out[start:stop] = z.to(out.device, out.dtype)
        else:
            out[start:stop] = z.cpu().numpy()
        start = stop
    return fit


@dataclass(frozen=True)
class RefineResult:
    """``z`` (N, K) float32 (numpy or torch like the input) and the fit with its per-step history.

    ``q`` (N, K): the decoupled fit's final prior-free posterior (None for the joint method).
    """

    z: np.ndarray | torch.Tensor
    fit: SolverFit
    q: np.ndarray | torch.Tensor | None = None


def _as_tensors(logits: Any, features: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both inputs as tensors (numpy arrays are shared, not copied) and whether they came as numpy."""
    kinds = {isinstance(logits, np.ndarray), isinstance(features, np.ndarray)}
    if len(kinds) != 1:
        raise InputError(
            f"logits is a {type(logits).__name__} but features a {type(features).__name__}",
            hint="pass both as numpy arrays or both as torch tensors",
        )
    if not kinds.pop():
        return logits, features, False
    tensors = []
    for name, value in (("logits", logits), ("features", features)):
        if value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):  # any byte order
            raise InputError(f"{name} must hold float16/32/64 values, got {value.dtype}", hint=f"cast {name}")
        value = value.astype(value.dtype.newbyteorder("="), copy=False)  # torch needs native byte order
        if any(stride < 0 for stride in value.strides):  # e.g. array[::-1]; torch.from_numpy refuses these
            value = value.copy()
        with warnings.catch_warnings():
            # A read-only array (e.g. a memory map) is fine: the solver never writes into its inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors.append(torch.from_numpy(value))
    return tensors[0], tensors[1], True


def _refine(logits: Any, features: Any, settings: SolverSettings, *, joint: bool, record_history: bool
            ) -> RefineResult:
    logits_t, features_t, numpy_in = _as_tensors(logits, features)
    logits_t, features_t = check_chunk(logits_t, features_t, -1)
    if logits_t.shape[0] == 0:
        raise InputError("logits and features have no rows", hint="pass at least init_topk patches")

    def one_chunk() -> Iterator[Chunk]:
        yield logits_t, features_t

    fit = fit_context(one_chunk, settings, joint=joint, record_history=record_history)
    z = assign(logits_t, features_t, fit.state, settings)
    q = None if joint or not record_history else assign(logits_t, features_t, fit.state, settings, prior=False)
    if numpy_in:
        z, q = z.numpy(), (None if q is None else q.numpy())
    return RefineResult(z, fit, q)


def prior_probabilities(logits: torch.Tensor, settings: SolverSettings) -> torch.Tensor:
    """The prior the solver starts from, ``softmax_k(prior_scale * L)`` (N, K) float32: also the result of the
    baseline method and of a context too small to fit (the one rule for both)."""
    return torch.softmax(settings.prior_scale * logits.float(), dim=-1)


def refine(
    logits: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    settings: SolverSettings | None = None,
    *,
    joint: bool = True,
    **values: Any,
) -> np.ndarray | torch.Tensor:
    """Refine a per-patch prior with the context solver; returns z (N, K) float32.

    ``logits`` (N, K): cosine similarities patch/query; ``features`` (N, D): L2-normalised patch features (used
    as they are, float16/bfloat16 accepted, maths in float32). numpy in, numpy out; torch in, torch out on the
    inputs' device. ``settings`` (default :class:`~coninfer.settings.SolverSettings`), with any of its fields
    overridden by keyword (``refine(L, F, temperature=20)``). ``joint=False`` runs the decoupled method (prior-free
    fit, then one fusion with the prior). Raises :class:`~coninfer.errors.InputError` for bad shapes, values or
    settings.
    """
    settings = settings if settings is not None else SolverSettings()
    if values:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(SolverSettings)})
        if unknown:
            raise InputError(f"refine() got unknown solver settings {unknown}",
                             hint="use temperature, iterations, prior_scale, init_topk, free_temperature, block_rows")
        settings = dataclasses.replace(settings, **values)
    return _refine(logits, features, settings, joint=joint, record_history=False).z


def refine_with_history(
    logits: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    settings: SolverSettings = SolverSettings(),
    *,
    joint: bool = True,
) -> RefineResult:
    """:func:`refine` plus the means, variance and monitoring loss of every E-step (one more pass); for the
    decoupled method (``joint=False``) also the final prior-free posterior ``q``."""
    return _refine(logits, features, settings, joint=joint, record_history=True)
