"""The ConInfer context solver: a Gaussian mixture over patch features, steered by a per-patch prior.

Maths (golden README, section A; i = patch, k = query, d = feature dimension):

1. ``log P = log_softmax(prior_scale * L)`` over k, fixed for the whole run.
2. Initial mean of query k: the ``init_topk`` patches with the largest ``P[:, k]`` (ranked by log P, which
   has the same order without float32 underflow ties; remaining ties: lowest patch index first),
   ``mu_k = normalise(sum_i P[i, k] F[i])``; one shared diagonal variance ``v = 1/D``.
3. ``iterations + 1`` E-steps ``z[i] = softmax_k(log P[i] + ll[i] / temperature)`` with
   ``ll[i, k] = -0.5 * sum_d (F[i, d] - mu[k, d])^2 / v[d]``, and ``iterations`` M-steps between them:
   ``mu_k = normalise(sum_i z[i, k] F[i])``, ``v_d = sum_ik z[i, k] (F[i, d] - mu[k, d])^2 / sum_ik z[i, k]``.

How it is computed, so that memory stays ``O(N*K + K*D)`` and features may stream from disk in chunks:

* ``ll`` is expanded as ``F @ (mu / v)^T - 0.5 * sum_d mu^2 / v`` plus ``-0.5 * F^2 @ (1/v)``; the last term is
  the same for every k of a patch, so it cancels in the softmax and is never computed. No (N, K, D) tensor.
* ``P * exp(ll~ / T) / sum(...)`` is evaluated as one softmax of ``log P + ll / T``: the same numbers, but it
  cannot give 0/0 when P underflows.
* An M-step needs only sums over patches: ``sum_i z[i, k]`` (K), ``z^T F`` (K, D) and ``sum_i F[i]^2`` (D; since
  every row of z sums to one, ``sum_ik z[i, k] F[i, d]^2 = sum_i F[i, d]^2``). Then
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
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coninfer.errors import InputError
from coninfer.settings import SolverSettings

Chunk = tuple[torch.Tensor, torch.Tensor]
ChunkSource = Callable[[], Iterable[Chunk]]
Reduce = Callable[[torch.Tensor], torch.Tensor]
Gather = Callable[["TopKCandidates"], "TopKCandidates"]

_MONITOR_TEMPERATURE = 50.0  # the official monitoring loss hard-codes 1/50 whatever the temperature
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _no_gather(candidates: TopKCandidates) -> TopKCandidates:
    return candidates


@dataclass(frozen=True)
class SolverState:
    """Mixture parameters: ``means`` (K, D) float32 unit rows, ``variance`` (D,) float32 shared by all k."""

    means: torch.Tensor
    variance: torch.Tensor

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.variance.shape != self.means.shape[1:]:
            raise InputError(
                f"state shapes do not match: means {tuple(self.means.shape)}, variance {tuple(self.variance.shape)}",
                hint="means must be (K, D) and variance (D,)",
            )


@dataclass(frozen=True)
class SolverHistory:
    """What E-step t used and measured: ``means`` (T+1, K, D), ``variance`` (T+1, D), ``loss`` (T+1,) float64.

    ``loss[t]`` is the official monitoring loss KL(z||P) + KL(z||q), q = softmax(ll / 50), averaged over patches.
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


@dataclass(frozen=True)
class TopKCandidates:
    """Best ``m <= init_topk`` patches per query so far, sorted by (log prior descending, patch index ascending).

    ``log_prior`` (m, K) float32, ``index`` (m, K) int64 global patch index, ``features`` (m, K, D) float32.
    Several processes would all-gather their candidates and fold them with :meth:`merge`.
    """

    log_prior: torch.Tensor
    index: torch.Tensor
    features: torch.Tensor

    def merge(self, other: TopKCandidates, topk: int) -> TopKCandidates:
        log_prior = torch.cat([self.log_prior, other.log_prior])
        index = torch.cat([self.index, other.index])
        features = torch.cat([self.features, other.features.to(self.features.device)])
        # Two stable sorts give the order (log prior descending, index ascending) per column.
        by_index = torch.argsort(index, dim=0, stable=True)
        by_value = torch.argsort(log_prior.gather(0, by_index), dim=0, descending=True, stable=True)
        order = by_index.gather(0, by_value)[:topk]
        return _take_candidates(log_prior, index, features, order)


def _take_candidates(
    log_prior: torch.Tensor, index: torch.Tensor, features: torch.Tensor, order: torch.Tensor
) -> TopKCandidates:
    """Rows ``order`` (m, K) of each column: features (n, K, D) -> (m, K, D)."""
    num_queries = log_prior.shape[1]
    columns = torch.arange(num_queries, device=order.device).expand_as(order)
    return TopKCandidates(log_prior.gather(0, order), index.gather(0, order), features[order, columns])


def _chunk_candidates(log_prior: torch.Tensor, features: torch.Tensor, offset: int, topk: int) -> TopKCandidates:
    """Top ``topk`` rows per column of one chunk; log_prior (n, K), features (n, D)."""
    num_rows, num_queries = log_prior.shape
    topk = min(topk, num_rows)
    threshold = torch.topk(log_prior, topk, dim=0).values[-1]  # (K,)
    # Every row that is a candidate for some column (ties at the threshold included), in index order, so a
    # stable descending sort of this small sub-matrix gives the exact top-k with lowest-index tie-breaking.
    rows = torch.nonzero((log_prior >= threshold).any(dim=1)).squeeze(1)
    sub = log_prior[rows]  # (r, K)
    order = torch.argsort(sub, dim=0, descending=True, stable=True)[:topk]  # (m, K) rows of sub
    picked = rows[order]  # (m, K) rows of the chunk
    # (m*K, D) -> (m, K, D)
    picked_features = features[picked.reshape(-1)].to(torch.float32).reshape(topk, num_queries, -1)
    return TopKCandidates(sub.gather(0, order), picked + offset, picked_features)


def _initial_state(candidates: TopKCandidates, num_features: int) -> SolverState:
    """Means from the candidates' prior-weighted feature sum, variance 1/D."""
    weights = torch.exp(candidates.log_prior - candidates.log_prior[:1])  # (m, K), relative to the best
    sums = torch.einsum("mk,mkd->kd", weights.double(), candidates.features.double())
    norms = torch.linalg.vector_norm(sums, dim=1, keepdim=True)  # (K, 1)
    if not bool(torch.isfinite(norms).all()):
        query = int(torch.nonzero(~torch.isfinite(norms))[0, 0])
        raise InputError(
            f"features contain NaN or infinite values (in a top patch of query {query})",
            hint="check the feature extractor output",
        )
    if not bool((norms > 0).all()):
        query = int(torch.nonzero(norms <= 0)[0, 0])
        raise InputError(
            f"the initial mean of query {query} is undefined: its top patches' features sum to zero",
            hint="features must be L2-normalised rows",
        )
    means = (sums / norms).float()
    variance = torch.full((num_features,), 1.0 / num_features, dtype=torch.float32, device=means.device)
    return SolverState(means, variance)


def _check_chunk(logits: Any, features: Any, position: int, *, check_values: bool = True) -> Chunk:
    """Validated ``(logits float32 (n, K), features (n, D))``; ``position`` < 0 for a single in-memory chunk."""
    where = f" (chunk {position})" if position >= 0 else ""
    for name, value in (("logits", logits), ("features", features)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}{where} must be a torch tensor, got {type(value).__name__}")
        if value.ndim != 2:
            raise InputError(f"{name}{where} must be 2-D, got shape {tuple(value.shape)}", hint=f"reshape {name} to (N, ...)")
        if value.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{name}{where} must hold floats, got {value.dtype}")
    if features.shape[1] == 0:
        raise InputError(f"features{where} has 0 columns", hint="features must be (N, D) with D >= 1")
    if logits.shape[0] != features.shape[0]:
        raise InputError(
            f"logits{where} has {logits.shape[0]} rows but features has {features.shape[0]}",
            hint="both need one row per patch, in the same order",
        )
    if logits.device != features.device:
        raise InputError(f"logits{where} is on {logits.device} but features on {features.device}")
    if logits.shape[1] < 2:
        raise InputError(f"logits{where} has {logits.shape[1]} queries; the solver needs K >= 2", hint="add queries")
    logits = logits.to(torch.float32)
    if check_values and not bool(torch.isfinite(logits).all()):
        raise InputError(f"logits{where} contain NaN or infinite values", hint="check the prior that produced them")
    return logits, features


class _Pass:
    """Walks a chunk source, once per ``iter()``, checking that every pass sees the same data layout.

    Logit values are checked on the first pass only; feature values through their sum of squares (first E-step)
    or the finiteness of z (:func:`assign`).
    """

    def __init__(self, chunks: ChunkSource) -> None:
        self.chunks = chunks
        self.num_patches = 0
        self.sizes: tuple[int, int] | None = None  # (K, D)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        offset = 0
        for position, (raw_logits, raw_features) in enumerate(self.chunks()):
            logits, features = _check_chunk(raw_logits, raw_features, position, check_values=not self.num_patches)
            sizes = (logits.shape[1], features.shape[1])
            if self.sizes is not None and sizes != self.sizes:
                raise InputError(
                    f"chunk {position} has K={sizes[0]}, D={sizes[1]}; expected K={self.sizes[0]}, D={self.sizes[1]}",
                    hint="every chunk must hold the same queries and feature size",
                )
            self.sizes = sizes
            if logits.shape[0]:  # an empty chunk contributes nothing
                yield offset, logits, features
            offset += logits.shape[0]
        if offset == 0:
            raise InputError("the chunk source yielded no patches", hint="check the chunk iterator")
        if self.num_patches and offset != self.num_patches:
            raise InputError(
                f"the chunk source yielded {offset} patches, {self.num_patches} on its first pass",
                hint="chunks() must return the same data every time it is called",
            )
        self.num_patches = offset


# Block maths works in a query-major (K, b) layout: torch's CPU softmax over a short trailing axis (K ~ 10) is
# about 4x slower than over the leading axis of the transposed view, and z^T F then needs no transpose.


def _blocks(logits: torch.Tensor, features: torch.Tensor, settings: SolverSettings) -> Iterator[Chunk]:
    """Row blocks: logits (b, K) float32, features (b, D) cast to float32."""
    block_rows = settings.block_rows or (2048 if features.device.type == "cpu" else 65536)
    for start in range(0, logits.shape[0], block_rows):
        stop = start + block_rows
        yield logits[start:stop], features[start:stop].to(torch.float32)


def _log_prior_t(block_logits: torch.Tensor, settings: SolverSettings) -> torch.Tensor:
    """log P, (b, K) logits -> (K, b)."""
    return torch.log_softmax((block_logits * settings.prior_scale).T, dim=0)


def _initial_pass(chunks: ChunkSource, settings: SolverSettings) -> tuple[TopKCandidates, _Pass]:
    """Top-k candidates per query. Reads only the logits and the candidate rows of the features."""
    walk = _Pass(chunks)
    candidates: TopKCandidates | None = None
    for offset, logits, features in walk:
        log_prior = torch.log_softmax(logits * settings.prior_scale, dim=1)
        if not bool(torch.isfinite(log_prior).all()):  # finite logits, but prior_scale * logits overflowed
            raise InputError(
                f"prior_scale * logits overflows float32 (logits up to {float(logits.abs().max()):.3g}, "
                f"prior_scale {settings.prior_scale:g})",
                hint="pass cosine similarities (about -1..1) as logits, not already-scaled or unbounded scores",
            )
        chunk_best = _chunk_candidates(log_prior, features, offset, settings.init_topk)
        candidates = chunk_best if candidates is None else candidates.merge(chunk_best, settings.init_topk)
    assert candidates is not None  # _Pass raises on an empty source
    return candidates, walk


@dataclass(frozen=True)
class _Likelihood:
    """``ll`` up to a per-patch constant: ``F @ (mu/v)^T - 0.5 sum_d mu^2/v``.

    Queries are zero-padded to a multiple of 16: MKL's GEMM with 9 output columns takes 1.5x the time of 16.
    """

    scaled_means: torch.Tensor  # (K_padded, D) float32
    offsets: torch.Tensor  # (K_padded,) float32
    num_queries: int

    @classmethod
    def from_state(cls, state: SolverState, device: torch.device) -> _Likelihood:
        num_queries, num_features = state.means.shape
        padded = -(-num_queries // 16) * 16
        scaled_means = torch.zeros(padded, num_features, dtype=torch.float32, device=device)
        scaled_means[:num_queries] = (state.means / state.variance).to(device)
        offsets = (scaled_means[:num_queries] * state.means.to(device)).sum(dim=1).mul(-0.5)
        return cls(scaled_means, torch.nn.functional.pad(offsets, (0, padded - num_queries)), num_queries)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        """(b, D) float32 -> (K, b)."""
        return torch.addmm(self.offsets, block, self.scaled_means.T)[:, : self.num_queries].T


def _e_step_t(log_prior_t: torch.Tensor, log_likelihood_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """z (K, b) = softmax over K of log P + ll / T (= P exp(ll~/T) normalised, without 0/0 when P underflows)."""
    return torch.softmax(log_prior_t + log_likelihood_t / temperature, dim=0)


def _monitor_loss(z_t: torch.Tensor, log_prior_t: torch.Tensor, log_likelihood_t: torch.Tensor) -> torch.Tensor:
    """Sum over the block of ``z (log z - log P) + z (log z - log q)``; terms with z == 0 count as 0."""
    log_q = torch.log_softmax(log_likelihood_t / _MONITOR_TEMPERATURE, dim=0)
    return (torch.xlogy(z_t, z_t) * 2 - z_t * (log_prior_t + log_q)).sum(dtype=torch.float64)


def _expectation_pass(
    walk: _Pass, state: SolverState, settings: SolverSettings, *, statistics: bool, squares: bool, loss: bool
) -> dict[str, torch.Tensor]:
    """One pass over all chunks, returning float64 sums: ``weight`` (K,) = sum_i z, ``weighted_features``
    (K, D) = z^T F (with ``statistics``), ``square_sum`` (D,) = sum_i F^2 (with ``squares``), ``loss``."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = value if name not in sums else sums[name] + value

    likelihood: _Likelihood | None = None
    for offset, logits, features in walk:
        if likelihood is None or likelihood.offsets.device != features.device:
            likelihood = _Likelihood.from_state(state, features.device)
        for block_logits, block in _blocks(logits, features, settings):
            log_prior_t = _log_prior_t(block_logits, settings)
            log_likelihood_t = likelihood(block)
            z_t = _e_step_t(log_prior_t, log_likelihood_t, settings.temperature)
            if statistics:
                add("weight", z_t.sum(dim=1, dtype=torch.float64))
                add("weighted_features", (z_t @ block).double())
            if squares:
                add("square_sum", block.square().sum(dim=0).double())
            if loss:
                add("loss", _monitor_loss(z_t, log_prior_t, log_likelihood_t))
        if squares and not bool(torch.isfinite(sums["square_sum"]).all()):
            # A NaN or infinity anywhere in the features makes their sum of squares non-finite: one cheap check.
            raise InputError(
                f"features contain NaN or infinite values (in rows {offset} to {offset + features.shape[0] - 1})",
                hint="check the feature extractor output",
            )
    return sums


def _m_step(
    weight: torch.Tensor, weighted_features: torch.Tensor, square_sum: torch.Tensor, previous: SolverState
) -> SolverState:
    """New means and variance from float64 sums: weight (K,), weighted_features (K, D), square_sum (D,)."""
    norms = torch.linalg.vector_norm(weighted_features, dim=1, keepdim=True)  # (K, 1)
    alive = (weight > 0).unsqueeze(1) & (norms > 0)
    # sum_i z F / sum_i z, normalised, equals z^T F normalised; a dead query keeps its mean (official: NaN).
    means = torch.where(alive, weighted_features / norms.clamp_min(1e-300), previous.means.to(weight.dtype))
    spread = square_sum - 2 * (means * weighted_features).sum(dim=0) + (weight.unsqueeze(1) * means.square()).sum(dim=0)
    variance = (spread / weight.sum()).clamp_min(torch.finfo(torch.float32).tiny)
    return SolverState(means.float(), variance.float())


@torch.no_grad()  # inputs that require grad must not record every iteration's autograd history
def fit_context(
    chunks: ChunkSource,
    settings: SolverSettings = SolverSettings(),
    *,
    reduce: Reduce = _no_reduce,
    gather: Gather = _no_gather,
    record_history: bool = False,
) -> SolverFit:
    """Fit the mixture over all chunks; returns the state that the final E-step (:func:`assign`) uses.

    ``chunks()`` must return a fresh iterator of ``(logits (n, K), features (n, D))`` tensors, the same data in
    the same order every time; it is called ``iterations + 1`` times (``iterations + 2`` with
    ``record_history``).

    Several processes, each with its own share of the patches, fit one mixture with two hooks: ``reduce`` is
    applied to every summed statistic before it is used (an all-reduce sum), and ``gather`` to this process's
    top-k candidates before the initial means are formed (an all-gather folded with :meth:`TopKCandidates.merge`;
    add the process's first global patch index to ``index`` so ties break as in one process). Without
    ``gather``, every process would start from its own local top-k patches.
    """
    candidates, walk = _initial_pass(chunks, settings)
    candidates = gather(candidates)
    if candidates.index.shape[0] < settings.init_topk:
        raise InputError(
            f"only {candidates.index.shape[0]} patches but init_topk={settings.init_topk}",
            hint="give at least init_topk patches or lower init_topk",
        )
    state = _initial_state(candidates, candidates.features.shape[2])
    num_patches = walk.num_patches
    if record_history:  # the loss is averaged over the patches of all processes
        num_patches = float(reduce(torch.tensor(float(walk.num_patches), dtype=torch.float64)))
    square_sum: torch.Tensor | None = None
    means, variances, losses = [], [], []
    for step in range(settings.iterations + int(record_history)):
        statistics = step < settings.iterations
        sums = _expectation_pass(
            walk, state, settings, statistics=statistics, squares=square_sum is None and statistics, loss=record_history
        )
        if record_history:
            means.append(state.means)
            variances.append(state.variance)
            losses.append(reduce(sums["loss"]).cpu() / num_patches)
        if statistics:
            device = state.means.device
            square_sum = reduce(sums["square_sum"]).to(device) if square_sum is None else square_sum
            weight = reduce(sums["weight"]).to(device)
            state = _m_step(weight, reduce(sums["weighted_features"]).to(device), square_sum, state)
    history = None
    if record_history:
        history = SolverHistory(torch.stack(means), torch.stack(variances), torch.stack(losses))
    return SolverFit(state, walk.num_patches, history)


@torch.no_grad()
def assign(logits: torch.Tensor, features: torch.Tensor, state: SolverState, settings: SolverSettings) -> torch.Tensor:
    """Final soft assignment z (n, K) float32 for one chunk, on the features' device."""
    logits, features = _check_chunk(logits, features, -1)
    if (logits.shape[1], features.shape[1]) != tuple(state.means.shape):
        raise InputError(
            f"chunk has K={logits.shape[1]}, D={features.shape[1]} but the state has (K, D) = {tuple(state.means.shape)}",
            hint="assign chunks with the queries and features the state was fitted on",
        )
    if logits.shape[0] == 0:
        return torch.empty(0, logits.shape[1], dtype=torch.float32, device=features.device)
    likelihood = _Likelihood.from_state(state, features.device)
    parts = [
        _e_step_t(_log_prior_t(block_logits, settings), likelihood(block), settings.temperature)
        for block_logits, block in _blocks(logits, features, settings)
    ]
    z = torch.cat(parts, dim=1).T.contiguous()  # (K, n) -> (n, K)
    if not bool(torch.isfinite(z).all()):
        raise InputError("features contain NaN or infinite values", hint="check the feature extractor output")
    return z


def assign_chunks(chunks: ChunkSource, state: SolverState, settings: SolverSettings) -> Iterator[torch.Tensor]:
    """Yield z (n, K) float32 for every chunk of ``chunks()``, in order."""
    for logits, features in chunks():
        yield assign(logits, features, state, settings)


def refine_chunked(
    chunks: ChunkSource,
    out: np.ndarray | torch.Tensor,
    settings: SolverSettings = SolverSettings(),
    *,
    reduce: Reduce = _no_reduce,
    gather: Gather = _no_gather,
) -> SolverFit:
    """Fit over ``chunks`` and write z into ``out`` (N, K) (numpy array, memmap or tensor), chunk after chunk.
    ``reduce`` and ``gather``: see :func:`fit_context`."""
    fit = fit_context(chunks, settings, reduce=reduce, gather=gather)
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
    """``z`` (N, K) float32 (numpy or torch like the input) and the fit with its per-step history."""

    z: np.ndarray | torch.Tensor
    fit: SolverFit


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


def _refine(logits: Any, features: Any, settings: SolverSettings, record_history: bool) -> RefineResult:
    logits_t, features_t, numpy_in = _as_tensors(logits, features)
    logits_t, features_t = _check_chunk(logits_t, features_t, -1)
    if logits_t.shape[0] == 0:
        raise InputError("logits and features have no rows", hint="pass at least init_topk patches")

    def one_chunk() -> Iterator[Chunk]:
        yield logits_t, features_t

    fit = fit_context(one_chunk, settings, record_history=record_history)
    z = assign(logits_t, features_t, fit.state, settings)
    return RefineResult(z.numpy() if numpy_in else z, fit)


def refine(
    logits: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    settings: SolverSettings | None = None,
    **values: Any,
) -> np.ndarray | torch.Tensor:
    """Refine a per-patch prior with the context solver; returns z (N, K) float32.

    ``logits`` (N, K): cosine similarities patch/query; ``features`` (N, D): L2-normalised patch features (used
    as they are, float16/bfloat16 accepted, maths in float32). numpy in, numpy out; torch in, torch out on the
    inputs' device. ``settings`` (default :class:`~coninfer.settings.SolverSettings`), with any of its fields
    overridden by keyword (``refine(L, F, temperature=20)``). Raises :class:`~coninfer.errors.InputError` for bad
    shapes, values or settings.
    """
    settings = settings if settings is not None else SolverSettings()
    if values:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(SolverSettings)})
        if unknown:
            raise InputError(f"refine() got unknown solver settings {unknown}",
                             hint="use temperature, iterations, prior_scale, init_topk, free_temperature, block_rows")
        settings = dataclasses.replace(settings, **values)
    return _refine(logits, features, settings, record_history=False).z


def refine_with_history(
    logits: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    settings: SolverSettings = SolverSettings(),
) -> RefineResult:
    """:func:`refine` plus the means, variance and monitoring loss of every E-step (one more pass)."""
    return _refine(logits, features, settings, record_history=True)
