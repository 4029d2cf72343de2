"""Several processes, one result: torch.distributed set up from torchrun's environment, and the solver hooks.

:func:`setup` reads torchrun's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Without ``WORLD_SIZE`` the run is world size 1 and no process group exists; every helper here
is then a no-op. With it, a process group is joined (even of one process, so a one-process torchrun exercises
the collectives): NCCL for CUDA, Gloo for the CPU; ``--device cuda`` and ``auto`` pick ``cuda:LOCAL_RANK``.

**Reduction order (why the result does not depend on the world size).** Every reduction here is an all-gather
followed by a sum in rank order, ``((part_0 + part_1) + part_2) + ...``, computed identically on every rank, so
all ranks hold the same bits. The solver sums per-block float32 statistics in float64 across blocks and chunks
(:func:`coninfer.solver_core.expectation_pass`); a rank's part is that float64 sum over its share, and the
world-size-1 sum differs from the rank-order sum of parts only by float64 reassociation (~1e-16 relative), far
below the float32 rounding of the means, so z agrees with a single-process run to ~1e-7 and labels are
identical. Exactly identical when each rank's share is a run of whole chunks of the single-process chunk grid
(the float32 block sums are then the same; only float64 reassociation remains). Top-k candidates carry
global patch indices (``offset`` + local index) and are merged in rank order with
:meth:`~coninfer.solver_core.TopKCandidates.merge`, whose order (log prior descending, index ascending) is
independent of the merge order: the same candidates as one process. Confusion matrices are int64 sums: exact.
Shares (:func:`split`, :func:`band_of`) are contiguous and in rank order, like ``TileStore.share``.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from coninfer.errors import InputError, OutputError, ResourceError
from coninfer.settings import SolverSettings
from coninfer.solver import SolverFit, fit_context
from coninfer.solver_core import ChunkSource, Gather, Reduce, TopKCandidates, initial_state, m_step

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run. ``backend`` is None when no process group exists (world size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the GPU for NCCL, the CPU for Gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


_current = Dist()


def current() -> Dist:
    """The :class:`Dist` of the last :func:`setup` (world size 1 before any)."""
    return _current


def is_main(dist: Dist | None = None) -> bool:
    """Rank 0: the one that writes shared outputs (results, reports, resume state)."""
    return (dist or _current).is_main


def setup(device: str = "auto", *, timeout: timedelta | None = None) -> Dist:
    """Join the run torchrun (or any launcher setting its variables) started; world size 1 without them.

    ``device``: the ``--device`` value. ``timeout``: how long a collective (and the rendezvous) may wait for the
    other ranks (torch's default otherwise). Calling it again returns the group already joined.
    """
    global _current
    if _current.grouped and tdist.is_initialized():
        return _current
    if "WORLD_SIZE" not in os.environ:
        from coninfer.tile_step import resolve_device

        _current = Dist(device=resolve_device(device))
        return _current
    rank, world_size, local_rank = _launch_ranks()
    torch_device = _rank_device(device, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    try:
        tdist.init_process_group(backend, rank=rank, world_size=world_size, init_method="env://", **options)
    except (RuntimeError, ValueError) as error:  # DistNetworkError / DistStoreError derive from RuntimeError
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"rank {rank} cannot join the process group at {where}: {reason}",
                         hint="check that every rank can reach rank 0 at MASTER_ADDR:MASTER_PORT "
                              "(torchrun --rdzv-endpoint) and that the port is free") from error
    _current = Dist(rank, world_size, local_rank, backend, torch_device)
    return _current


def _launch_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment, refusing a launch that cannot rendezvous."""
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: no rendezvous for the ranks",
                         hint="launch with torchrun (--nproc-per-node=N, and --rdzv-endpoint for several "
                              "nodes), or unset WORLD_SIZE for one process")
    try:
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise InputError(f"bad launch variable: {error}", hint="WORLD_SIZE, RANK and LOCAL_RANK are integers "
                         "(torchrun sets them)") from error
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise InputError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})",
                         hint="let torchrun set RANK and WORLD_SIZE")
    return rank, world_size, local_rank


def _rank_device(device: str, local_rank: int) -> torch.device:
    """``cuda``/``auto`` -> ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is kept (launchers that give each rank its
    own CUDA_VISIBLE_DEVICES); ``cpu`` stays."""
    from coninfer.tile_step import resolve_device

    requested = str(device)
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        return resolve_device(requested)
    resolve_device("cuda")  # the one error for a machine without CUDA
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ResourceError(f"rank with LOCAL_RANK={local_rank} has no GPU: this node has {count} "
                            f"(--device {requested})",
                            hint="launch at most one process per GPU (torchrun --nproc-per-node), or, if the "
                                 "launcher gives each rank its own CUDA_VISIBLE_DEVICES, pass --device cuda:0")
    return torch.device("cuda", local_rank)


def teardown() -> None:
    """Leave the process group (a no-op without one); :func:`current` is world size 1 again."""
    global _current
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
        # release the group's C++ objects (Gloo's worker threads) now, while the interpreter is whole: left to
        # interpreter shutdown they may be destroyed after the runtime they need (SIGABRT at exit)
        gc.collect()
    _current = Dist()


def barrier(dist: Dist) -> None:
    if not dist.grouped:
        return
    if dist.backend == "nccl":
        tdist.barrier(device_ids=[dist.device.index])
    else:
        tdist.barrier()


def broadcast_object(dist: Dist, value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable; for small things: settings, a resume state)."""
    if not dist.grouped:
        return value
    holder = [value]
    tdist.broadcast_object_list(holder, src=0, device=dist.comm_device)
    return holder[0]


def all_gather_tensor(dist: Dist, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on ``tensor``'s device."""
    if not dist.grouped:
        return [tensor]
    local = tensor.to(dist.comm_device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.world_size)]
    tdist.all_gather(parts, local)
    return [part.to(tensor.device) for part in parts]


def _sum_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def all_gather_counts(dist: Dist, count: int) -> list[int]:
    """Every rank's integer, in rank order."""
    return [int(v) for v in all_gather_tensor(dist, torch.tensor([count], dtype=torch.int64))]


def split(dist: Dist, items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (shares of ranks 0..N-1 cover them in order; as TileStore.share)."""
    count = len(items)
    return list(items[count * dist.rank // dist.world_size : count * (dist.rank + 1) // dist.world_size])


def band_of(dist: Dist, num_rows: int) -> range:
    """This rank's contiguous band of ``num_rows`` rows (e.g. tile rows to stitch); may be empty."""
    return range(num_rows * dist.rank // dist.world_size, num_rows * (dist.rank + 1) // dist.world_size)


def all_reduce_confusion(dist: Dist, matrix: np.ndarray) -> np.ndarray:
    """The int64 sum over ranks of every rank's ``matrix`` (same shape on all ranks): exact."""
    local = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.int64))
    if not dist.grouped:
        return local.numpy().copy()
    summed = local.to(dist.comm_device)
    tdist.all_reduce(summed, op=tdist.ReduceOp.SUM)
    return summed.cpu().numpy()


class _Steps:
    """Checks that the ranks call the hooks in the same order with the same sizes: a mismatch is an error
    naming the ranks, not a hang or a sum of unrelated statistics."""

    def __init__(self, dist: Dist) -> None:
        self.dist, self.number = dist, 0

    def check(self, what: str, size: int) -> None:
        self.number += 1
        headers = all_gather_tensor(self.dist, torch.tensor([self.number, size], dtype=torch.int64))
        mine = headers[self.dist.rank]
        odd = [rank for rank, header in enumerate(headers) if not torch.equal(header, mine)]
        if odd:
            raise RuntimeError(f"rank {self.dist.rank} is at {what} #{self.number} (size {size}) but rank(s) "
                               f"{odd} are not: the ranks' solver calls are out of step")


def reduce_hook(dist: Dist) -> Reduce:
    """The solver's ``reduce``: a float64 statistic summed over ranks in rank order (see the module docstring)."""
    if not dist.grouped:
        return lambda tensor: tensor
    steps = _Steps(dist)

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        steps.check("reduce", tensor.numel())
        return _sum_in_rank_order(all_gather_tensor(dist, tensor))

    return reduce


def gather_hook(dist: Dist, offset: int, topk: int) -> Gather:
    """The solver's ``gather``: every rank's top-k candidates, their indices shifted by the rank's ``offset``
    (global index of its first patch), merged in rank order and cut to ``topk`` (``init_topk``). Ranks may
    hold fewer candidates than ``topk`` (a small share), or none."""
    if not dist.grouped:
        return lambda candidates: TopKCandidates(candidates.log_prior, candidates.index + offset,
                                                 candidates.features)
    steps = _Steps(dist)

    def gather(candidates: TopKCandidates) -> TopKCandidates:
        rows, num_queries = candidates.log_prior.shape
        steps.check("gather", num_queries * candidates.features.shape[2])
        counts = all_gather_counts(dist, rows)
        padding = max(counts) - rows  # all_gather needs one shape on every rank
        log_prior = torch.nn.functional.pad(candidates.log_prior, (0, 0, 0, padding))
        index = torch.nn.functional.pad(candidates.index + offset, (0, 0, 0, padding))
        features = torch.nn.functional.pad(candidates.features, (0, 0, 0, 0, 0, padding))
        merged: TopKCandidates | None = None
        parts = zip(all_gather_tensor(dist, log_prior), all_gather_tensor(dist, index),
                    all_gather_tensor(dist, features), counts, strict=True)
        for part_prior, part_index, part_features, count in parts:  # rank order
            part = TopKCandidates(part_prior[:count], part_index[:count], part_features[:count])
            merged = part if merged is None else merged.merge(part, topk)
        assert merged is not None
        return merged

    return gather


def fit_share(dist: Dist, chunks: ChunkSource, settings: SolverSettings, *, joint: bool, num_patches: int,
              num_queries: int, num_features: int, device: torch.device | None = None) -> SolverFit:
    """One mixture over the patches of all ranks; every rank gets the same state.

    ``chunks``: this rank's share (a run of the context's patches, the shares in rank order); ``num_patches``:
    how many patches it yields (0 is allowed: the rank then only takes part in the collectives).
    ``num_queries``/``num_features``: K and D. ``SolverFit.num_patches`` is this rank's count.
    """
    counts = all_gather_counts(dist, num_patches)
    if not sum(counts):  # every rank would wait for candidates that none has
        raise InputError("the chunk sources of all ranks yielded no patches", hint="check the shares of tiles")
    if num_patches:
        fit = fit_context(chunks, settings, joint=joint, reduce=reduce_hook(dist),
                          gather=gather_hook(dist, sum(counts[: dist.rank]), settings.init_topk))
        return SolverFit(fit.state, num_patches)
    return _follow_fit(dist, settings, num_queries, num_features, device or dist.device)


def _follow_fit(dist: Dist, settings: SolverSettings, num_queries: int, num_features: int,
                device: torch.device) -> SolverFit:
    """A rank without patches: the collectives of :func:`~coninfer.solver.fit_context` with empty candidates
    and zero sums, and the same initial state and M-steps from what the others send."""
    empty = TopKCandidates(torch.empty(0, num_queries, device=device),
                           torch.empty(0, num_queries, dtype=torch.int64, device=device),
                           torch.empty(0, num_queries, num_features, device=device))
    candidates = gather_hook(dist, 0, settings.init_topk)(empty)
    if candidates.index.shape[0] < settings.init_topk:  # the same refusal as the ranks with patches
        raise InputError(f"only {candidates.index.shape[0]} patches but init_topk={settings.init_topk}",
                         hint="give at least init_topk patches or lower init_topk")
    state = initial_state(candidates, num_features)
    reduce = reduce_hook(dist)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    square_sum = None
    for _ in range(settings.iterations):  # fit_context's order: square_sum (once), weight, weighted_features
        square_sum = reduce(zeros(num_features)) if square_sum is None else square_sum
        weight = reduce(zeros(num_queries))
        state = m_step(weight, reduce(zeros(num_queries, num_features)), square_sum, state)
    return SolverFit(state, 0)


def check_shared_folder(dist: Dist, folder: str | Path, *, option: str = "--workdir") -> None:
    """Refuse a work folder that some rank does not see (a node-local path on several nodes): rank 0 writes a
    token file, every rank reads it back, the verdicts are gathered; all ranks raise the same error."""
    if not dist.grouped or dist.world_size == 1:
        return
    folder = Path(folder)
    token, failure = "", ""
    if dist.is_main:
        token = uuid.uuid4().hex
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".coninfer-shared-{token}").write_text(token, encoding="utf-8")
        except OSError as error:
            failure = f"{option} {folder} is not writable: {error.strerror or error}"
    # after rank 0's write: the broadcast orders it before the other ranks' reads
    token, failure = broadcast_object(dist, (token, failure))
    if failure:
        raise OutputError(failure, hint=f"pass {option} with a folder every rank can write")
    path = folder / f".coninfer-shared-{token}"
    verdicts = all_gather_counts(dist, int(_sees_token(path, token)))
    if dist.is_main:
        path.unlink(missing_ok=True)
    blind = [rank for rank, ok in enumerate(verdicts) if not ok]
    if blind:
        raise InputError(f"{option} {folder} is not shared by all ranks: rank(s) {', '.join(map(str, blind))} "
                         "do not see rank 0's files there",
                         hint=f"put {option} on a filesystem every node mounts (a shared scratch folder)")


def _sees_token(path: Path, token: str, tries: int = 3) -> bool:
    """Whether ``path`` holds ``token``; a few short retries for network filesystems' attribute caches."""
    for attempt in range(tries):
        try:
            if path.read_text(encoding="utf-8") == token:
                return True
        except OSError:
            pass
        if attempt + 1 < tries:
            time.sleep(0.5)
    return False


def all_gather_object(dist: Dist, value: T) -> list[T]:
    """Every rank's ``value`` (picklable, small: a report, an error message), in rank order."""
    if not dist.grouped:
        return [value]
    values: list = [None] * dist.world_size
    tdist.all_gather_object(values, value)
    return values
