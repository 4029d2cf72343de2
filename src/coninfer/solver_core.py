"""Streamed building blocks of the context solver (:mod:`coninfer.solver` composes them; maths there).

Everything here works on chunks of ``(logits (n, K), features (n, D))`` and row blocks of them, keeping only
sums over patches, so that memory stays ``O(N*K + K*D)``: the chunk walk with its layout checks, the top-k
initialisation, the likelihood, the two E-steps (prior-fused for the joint method and the final fusion,
prior-free for the decoupled method's fit), one expectation pass and the M-step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from coninfer.errors import InputError
from coninfer.settings import SolverSettings

Chunk = tuple[torch.Tensor, torch.Tensor]
ChunkSource = Callable[[], Iterable[Chunk]]
Reduce = Callable[[torch.Tensor], torch.Tensor]
Gather = Callable[["TopKCandidates"], "TopKCandidates"]

_MONITOR_TEMPERATURE = 50.0  # the official monitoring loss hard-codes 1/50 whatever the temperature
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def no_gather(candidates: TopKCandidates) -> TopKCandidates:
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


def initial_state(candidates: TopKCandidates, num_features: int) -> SolverState:
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


def check_chunk(logits: Any, features: Any, position: int, *, check_values: bool = True) -> Chunk:
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


class ChunkPass:
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
            logits, features = check_chunk(raw_logits, raw_features, position, check_values=not self.num_patches)
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


def row_blocks(logits: torch.Tensor, features: torch.Tensor, settings: SolverSettings) -> Iterator[Chunk]:
    """Row blocks: logits (b, K) float32, features (b, D) cast to float32."""
    block_rows = settings.block_rows or (2048 if features.device.type == "cpu" else 65536)
    for start in range(0, logits.shape[0], block_rows):
        stop = start + block_rows
        yield logits[start:stop], features[start:stop].to(torch.float32)


def prior_log_t(block_logits: torch.Tensor, settings: SolverSettings) -> torch.Tensor:
    """log P, (b, K) logits -> (K, b)."""
    return torch.log_softmax((block_logits * settings.prior_scale).T, dim=0)


def initial_pass(chunks: ChunkSource, settings: SolverSettings) -> tuple[TopKCandidates, ChunkPass]:
    """Top-k candidates per query. Reads only the logits and the candidate rows of the features."""
    walk = ChunkPass(chunks)
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
    assert candidates is not None  # ChunkPass raises on an empty source
    return candidates, walk


@dataclass(frozen=True)
class Likelihood:
    """``ll`` up to a per-patch constant: ``F @ (mu/v)^T - 0.5 sum_d mu^2/v``.

    Queries are zero-padded to a multiple of 16: MKL's GEMM with 9 output columns takes 1.5x the time of 16.
    """

    scaled_means: torch.Tensor  # (K_padded, D) float32 (or float64)
    offsets: torch.Tensor  # (K_padded,)
    num_queries: int

    @classmethod
    def from_state(cls, state: SolverState, device: torch.device, dtype: torch.dtype = torch.float32) -> Likelihood:
        num_queries, num_features = state.means.shape
        padded = -(-num_queries // 16) * 16
        means = state.means.to(device, dtype)
        scaled_means = torch.zeros(padded, num_features, dtype=dtype, device=device)
        scaled_means[:num_queries] = means / state.variance.to(device, dtype)
        offsets = (scaled_means[:num_queries] * means).sum(dim=1).mul(-0.5)
        return cls(scaled_means, torch.nn.functional.pad(offsets, (0, padded - num_queries)), num_queries)

    @property
    def dtype(self) -> torch.dtype:
        return self.scaled_means.dtype

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        """(b, D) -> (K, b) in the likelihood's dtype."""
        return torch.addmm(self.offsets, block.to(self.dtype), self.scaled_means.T)[:, : self.num_queries].T


def fused_e_step_t(log_prior_t: torch.Tensor, log_likelihood_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """z (K, b) = softmax over K of log P + ll / T (= P exp(ll~/T) normalised, without 0/0 when P underflows)."""
    return torch.softmax(log_prior_t + log_likelihood_t / temperature, dim=0)


def free_temperature(settings: SolverSettings) -> float:
    """E-step temperature of the decoupled method's prior-free fit (``free_temperature``, else ``temperature``)."""
    return settings.temperature if settings.free_temperature is None else settings.free_temperature


def likelihood_dtype(prior: bool) -> torch.dtype:
    """float32 for the prior-fused E-step, float64 for the prior-free one.

    At t_free = 1 the prior-free q is ``temperature`` (50x) more sensitive to rounding in ll than z: float32 ll
    (terms ~1/v ~ D that cancel) gave q errors of 1.4e-4 at D = 1024, close to the golden 2e-4. The likelihood
    GEMM is only (b, D) x (D, K), so float64 costs little.
    """
    return torch.float32 if prior else torch.float64


def free_e_step_t(log_likelihood_t: torch.Tensor, settings: SolverSettings) -> torch.Tensor:
    """q (K, b) = softmax over K of ll / t_free: the mixture's own posterior, the prior does not enter."""
    return torch.softmax(log_likelihood_t / free_temperature(settings), dim=0)


def _monitor_loss(z_t: torch.Tensor, log_prior_t: torch.Tensor, log_likelihood_t: torch.Tensor) -> torch.Tensor:
    """Sum over the block of ``z (log z - log P) + z (log z - log q)``; terms with z == 0 count as 0."""
    log_q = torch.log_softmax(log_likelihood_t / _MONITOR_TEMPERATURE, dim=0)
    return (torch.xlogy(z_t, z_t) * 2 - z_t * (log_prior_t + log_q)).sum(dtype=torch.float64)


def expectation_pass(
    walk: ChunkPass,
    state: SolverState,
    settings: SolverSettings,
    *,
    joint: bool,
    statistics: bool,
    squares: bool,
    loss: bool,
) -> dict[str, torch.Tensor]:
    """One pass over all chunks, returning float64 sums: ``weight`` (K,) = sum_i r, ``weighted_features``
    (K, D) = r^T F (with ``statistics``), ``square_sum`` (D,) = sum_i F^2 (with ``squares``), ``loss``.

    The responsibilities r are the prior-fused z with ``joint``, else the prior-free q. ``loss`` is always the
    monitoring loss of the prior-fused z (for the decoupled method: of the fusion made from this state)."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = value if name not in sums else sums[name] + value

    likelihood: Likelihood | None = None
    for offset, logits, features in walk:
        if likelihood is None or likelihood.offsets.device != features.device:
            likelihood = Likelihood.from_state(state, features.device, likelihood_dtype(joint))
        for block_logits, block32 in row_blocks(logits, features, settings):
            block = block32.to(likelihood.dtype)  # a no-op for the joint solver
            log_prior_t = prior_log_t(block_logits, settings)
            log_likelihood_t = likelihood(block)
            z_t = fused_e_step_t(log_prior_t, log_likelihood_t, settings.temperature) if joint or loss else None
            if statistics:
                r_t = z_t if joint else free_e_step_t(log_likelihood_t, settings)
                add("weight", r_t.sum(dim=1, dtype=torch.float64))
                # per-block sums in float32 as in the joint solver; only ll needed float64
                add("weighted_features", (r_t.to(torch.float32) @ block32).double())
            if squares:
                add("square_sum", block32.square().sum(dim=0).double())
            if loss:
                add("loss", _monitor_loss(z_t, log_prior_t, log_likelihood_t))
        if squares and not bool(torch.isfinite(sums["square_sum"]).all()):
            # A NaN or infinity anywhere in the features makes their sum of squares non-finite: one cheap check.
            raise InputError(
                f"features contain NaN or infinite values (in rows {offset} to {offset + features.shape[0] - 1})",
                hint="check the feature extractor output",
            )
    return sums


def m_step(
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

