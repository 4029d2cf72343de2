"""Evaluate a prediction function on one benchmark, batch by batch, resumably.

The caller supplies ``predict_batch(images) -> class maps`` (the ConInfer pipeline, a baseline, a fake in tests), so
this module needs no model. Images go in the order of :func:`coninfer.evaluate.loaders.list_samples` (sorted file
names, or the split file's order) in consecutive batches of ``context_size``.

**Order dependence.** ConInfer fits one Gaussian mixture jointly over all patches of a batch, so an image's
prediction depends on which images share its batch. The paper used mmseg's unshuffled dataloader with batch size 50
over this order; keep ``context_size=50`` and no ``limit`` to reproduce its numbers. ``limit`` (the first N images)
and other context sizes change the batches and therefore the results, not only their number.

**Resuming.** With ``state_path``, the confusion matrix and the number of images done are written there (JSON,
atomically) after every batch. A rerun with the same dataset, method, context size, limit, image list and settings
continues after the last finished batch and ends with the same result as an uninterrupted run.

**Several processes** (:mod:`coninfer.distributed`, e.g. under torchrun). Batches are dealt in rounds of
``world_size``: batch ``b`` goes to rank ``b % world_size``. After each round the ranks' confusion matrices are
all-reduced (int64: exact), so every rank holds the same total and rank 0 writes the state, which has no
trace of the world size: a run resumes with any number of processes. The batches and their contents are the
single-process ones, hence the result (and its JSON) is identical for any world size. Rank 0 reads the state
and sends it to the others, so only rank 0 needs to see ``state_path``; every rank needs the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from coninfer._fs import atomic_write_text
from coninfer.errors import InputError, OutputError
from coninfer.evaluate.loaders import list_samples, load_sample
from coninfer.evaluate.metrics import ConfusionMatrix
from coninfer.evaluate.specs import METRIC_MIOU, DatasetSpec, load_dataset_spec

if TYPE_CHECKING:
    from coninfer.distributed import Dist

PredictBatch = Callable[[list[np.ndarray]], Sequence[Any]]
"""images -> one (H, W) integer class map per image: numpy arrays, or torch tensors on any device."""
_STATE_VERSION = 1
READ_WORKERS = min(8, os.cpu_count() or 1)
"""Threads that read and decode the next batch's images and labels while the current one is predicted (Pillow
and GDAL release the GIL while they decode)."""


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


@dataclass(frozen=True)
class EvalResult:
    """One dataset's score. ``value``, ``per_class`` (IoU) and ``aacc`` are percentages like the paper's tables;
    None marks a class absent from both prediction and ground truth."""

    dataset: str
    method: str
    metric: str
    value: float | None
    per_class: dict[str, float | None]
    aacc: float | None
    n_images: int
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_images < 0:
            raise InputError(f"EvalResult: bad n_images {self.n_images}", hint="a count of images >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "method": self.method,
            "metric": self.metric,
            "value": self.value,
            "per_class": dict(self.per_class),
            "aAcc": self.aacc,
            "n_images": self.n_images,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        try:
            return cls(
                dataset=data["dataset"],
                method=data["method"],
                metric=data["metric"],
                value=data["value"],
                per_class=dict(data["per_class"]),
                aacc=data["aAcc"],
                n_images=int(data["n_images"]),
                settings=dict(data.get("settings", {})),
            )
        except (KeyError, TypeError) as error:
            raise InputError(f"not an evaluation result: missing {error}", hint="pass a results JSON written by coninfer") from error


def result_from_matrix(
    spec: DatasetSpec, matrix: ConfusionMatrix, *, method: str, n_images: int, settings: Mapping[str, Any]
) -> EvalResult:
    """Scores of an accumulated matrix in the dataset's metric (mIoU, or the foreground class's IoU)."""
    scores = matrix.scores()
    value = scores.miou if spec.metric == METRIC_MIOU else float(scores.iou[spec.foreground_index])
    return EvalResult(
        dataset=spec.name,
        method=method,
        metric=spec.metric,
        value=_percent(value),
        per_class={name: _percent(v) for name, v in scores.per_class().items()},
        aacc=_percent(scores.aacc),
        n_images=n_images,
        settings=dict(settings),
    )


def _fingerprint(spec: DatasetSpec, names: list[str], method: str, context_size: int, limit: int | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    try:
        settings_json = json.loads(json.dumps(dict(settings), sort_keys=True))
    except (TypeError, ValueError) as error:
        raise InputError(f"settings are not JSON-serialisable: {error}", hint="pass plain numbers and strings") from error
    return {
        "dataset": spec.name,
        "method": method,
        "context_size": context_size,
        "limit": limit,
        "n_images": len(names),
        "images_sha1": hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest(),
        "settings": settings_json,
    }


def _load_state(path: Path, fingerprint: dict[str, Any], spec: DatasetSpec) -> tuple[ConfusionMatrix, int] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        matrix = ConfusionMatrix.from_list(
            state["matrix"], ignore_index=spec.label_encoding.ignore_index, class_names=spec.class_names
        )
        done, saved = int(state["n_done"]), state["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, InputError) as error:
        raise InputError(f"cannot read evaluation state {path}: {error}", hint="delete it to start over") from error
    if state.get("version") != _STATE_VERSION or saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise InputError(
            f"evaluation state {path} belongs to a run with other {', '.join(changed) or 'format'}",
            hint="use another state path, or delete this file to start over",
        )
    if matrix.num_classes != spec.num_classes or not 0 <= done <= fingerprint["n_images"]:
        raise InputError(f"evaluation state {path} is inconsistent", hint="delete it to start over")
    return matrix, done


def _save_state(path: Path, fingerprint: dict[str, Any], matrix: ConfusionMatrix, done: int) -> None:
    payload = {"version": _STATE_VERSION, "fingerprint": fingerprint, "n_done": done, "matrix": matrix.to_list()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload))
    except OSError as error:
        raise OutputError(f"cannot write evaluation state {path}: {error}", hint="check the folder is writable") from error


def _check_predictions(predictions: Sequence[np.ndarray], labels: list[np.ndarray], first: int) -> None:
    if len(predictions) != len(labels):
        raise InputError(
            f"predict_batch returned {len(predictions)} maps for {len(labels)} images",
            hint="return one (H, W) class map per input image, in order",
        )
    for offset, (prediction, label) in enumerate(zip(predictions, labels, strict=True)):
        # a tensor's own shape: np.shape would copy a GPU tensor to the host (or fail) to read it
        shape = tuple(prediction.shape) if hasattr(prediction, "shape") else np.shape(prediction)
        if shape != label.shape:  # only a caller's predict_batch: load_sample gives labels of their image's size
            raise InputError(
                f"predict_batch returned a {shape} map for image {first + offset}, whose label is {label.shape}",
                hint="return each class map at its image's resolution (H, W), the label's size",
            )


def evaluate_dataset(
    spec: DatasetSpec | str,
    data_root: str | Path,
    predict_batch: PredictBatch,
    *,
    context_size: int = 50,
    limit: int | None = None,
    state_path: str | Path | None = None,
    progress: bool = True,
    method: str = "ConInfer",
    settings: Mapping[str, Any] | None = None,
    dist: Dist | None = None,
) -> EvalResult:
    """Run ``predict_batch`` over a converted dataset and score it like mmseg's IoUMetric.

    ``predict_batch(images)``: images are (H, W, 3) uint8 RGB arrays; it returns one (H, W) integer class map per
    image, at the label's resolution (numpy, or a torch tensor on any device: scored there). ``settings``
    (JSON-serialisable) are stored with the result and must match for a resume. ``dist``: this process's place in
    a multi-process run (default: :func:`coninfer.distributed.current`); every rank returns the same result, only
    rank 0 writes the state.
    """
    from coninfer import distributed

    dist = dist or distributed.current()
    spec = load_dataset_spec(spec) if isinstance(spec, str) else spec
    if context_size < 1:
        raise InputError(f"context_size must be >= 1, got {context_size}", hint="the paper uses 50")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}", hint="omit it to evaluate every image")
    samples = list_samples(spec, data_root)[:limit]
    settings = dict(settings or {})
    fingerprint = _fingerprint(spec, [s.name for s in samples], method, context_size, limit, settings)
    state_path = Path(state_path) if state_path is not None else None
    matrix, done = _start_state(dist, spec, state_path, fingerprint)
    bar = tqdm(total=len(samples), initial=done, desc=f"eval {spec.name}", unit="img",
               disable=not (progress and dist.is_main and sys.stderr.isatty()))  # fmt: skip
    batches = [samples[first : first + context_size] for first in range(done, len(samples), context_size)]
    rounds = range(0, len(batches), dist.world_size)  # one round: a batch per rank
    mine = [batches[start + dist.rank] if start + dist.rank < len(batches) else None for start in rounds]
    loaded = _read_ahead(spec, mine)
    try:
        for start, pairs in zip(rounds, loaded, strict=True):
            round_batches = batches[start : start + dist.world_size]
            delta = _empty_matrix(spec)
            if pairs is not None:
                first = done + dist.rank * context_size
                _score_batch(pairs, predict_batch, delta, first)
            delta.matrix[...] = distributed.all_reduce_confusion(dist, delta.matrix)
            matrix.merge(delta)
            done += sum(len(batch) for batch in round_batches)
            if state_path is not None and dist.is_main:
                _save_state(state_path, fingerprint, matrix, done)
            bar.update(sum(len(batch) for batch in round_batches))
    finally:
        loaded.close()
        bar.close()
    result_settings = {"context_size": context_size, "limit": limit, **settings}
    return result_from_matrix(spec, matrix, method=method, n_images=len(samples), settings=result_settings)


def _empty_matrix(spec: DatasetSpec) -> ConfusionMatrix:
    return ConfusionMatrix(spec.num_classes, ignore_index=spec.label_encoding.ignore_index,
                           class_names=spec.class_names)


def _read_ahead(spec: DatasetSpec, batches: Sequence[list | None]) -> Iterator[list[tuple] | None]:
    """The (image, label) pairs of each batch in order (None stays None: a round without a batch for this rank);
    the next batch is read by :data:`READ_WORKERS` threads while the caller predicts this one. A read error is
    raised where its batch is taken, as a serial read would raise it."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=READ_WORKERS, thread_name_prefix="coninfer-eval-read")

    def submit(batch: list | None):
        return None if batch is None else [pool.submit(load_sample, spec, sample) for sample in batch]

    try:
        following = submit(batches[0]) if batches else None
        for index in range(len(batches)):
            current = following
            following = submit(batches[index + 1]) if index + 1 < len(batches) else None
            yield None if current is None else [future.result() for future in current]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _score_batch(pairs: list[tuple], predict_batch: PredictBatch, matrix: ConfusionMatrix, first: int) -> None:
    """Predict one batch of (image, label) pairs (its first image is image ``first`` of the run) and add it to
    ``matrix``."""
    images, labels = zip(*pairs, strict=True)
    predictions = predict_batch(list(images))
    _check_predictions(predictions, list(labels), first)
    # predictions may be tensors on the model's device: counted there, one (C+1, C+1) matrix back per batch
    matrix.update_many(zip(predictions, labels, strict=True))


def _start_state(dist: Dist, spec: DatasetSpec, state_path: Path | None, fingerprint: dict[str, Any]
                 ) -> tuple[ConfusionMatrix, int]:
    """(matrix, images done) to continue from: rank 0 reads the state and sends it (or its error) to all."""
    from coninfer import distributed

    payload: tuple[str, Any, Any] = ("ok", None, 0)
    if dist.is_main and state_path is not None:
        try:
            loaded = _load_state(state_path, fingerprint, spec)
        except InputError as error:
            if not dist.grouped:
                raise
            payload = ("error", error.args[0], error.hint)
        else:
            payload = ("ok", None, 0) if loaded is None else ("ok", loaded[0].to_list(), loaded[1])
    kind, matrix_rows, done = distributed.broadcast_object(dist, payload)
    if kind == "error":  # the same error on every rank, so none is left waiting for the others
        raise InputError(matrix_rows, hint=done)
    matrix = _empty_matrix(spec)
    if matrix_rows is not None:
        matrix.matrix[...] = np.asarray(matrix_rows, dtype=np.int64)
    return matrix, int(done)
