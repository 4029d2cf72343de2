"""Conversion as a list of tasks (one per raw image or image/label pair), run idempotently.

Each task reads its raw files and yields (output path, encoded bytes). Outputs are written atomically and only when
their bytes differ from what is on disk. A manifest in OUT_DIR (``.coninfer-convert-<dataset>.json``) remembers
each finished task's inputs (path, size, mtime) and outputs (size), so a rerun skips finished tasks without decoding
anything, and an interrupted conversion resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from coninfer._fs import atomic_write_text
from coninfer.errors import OutputError
from coninfer.evaluate.converters._io import RawFile, write_if_changed

_MANIFEST_VERSION = 1
_FLUSH_EVERY = 25


@dataclass(frozen=True)
class Task:
    """Produce some output files from ``sources``; ``key`` names the task uniquely within one conversion."""

    key: str
    sources: tuple[RawFile, ...]
    produce: Callable[[], Iterator[tuple[Path, bytes]]]


def copy_task(source: RawFile, destination: Path) -> Task:
    """Copy a raw file byte for byte (nothing to do when the destination is the source itself)."""

    def produce() -> Iterator[tuple[Path, bytes]]:
        in_place = source.member is None and destination.exists() and destination.resolve() == source.path.resolve()
        if not in_place:
            yield destination, source.read_bytes()

    return Task(f"copy:{'/'.join(source.parts)}", (source,), produce)


def map_task(source: RawFile, destination: Path, transform: Callable[[RawFile], bytes]) -> Task:
    """Write ``transform(source)`` (encoded bytes) to ``destination``."""

    def produce() -> Iterator[tuple[Path, bytes]]:
        yield destination, transform(source)

    return Task(f"map:{'/'.join(source.parts)}->{destination.name}", (source,), produce)


@dataclass(frozen=True)
class ConversionSummary:
    """What one ``convert_dataset`` call did."""

    dataset: str
    out_dir: Path
    tasks: int
    tasks_skipped: int
    files_written: int
    files_unchanged: int

    def __str__(self) -> str:
        return (
            f"{self.dataset}: {self.tasks} inputs ({self.tasks_skipped} already converted), "
            f"{self.files_written} files written, {self.files_unchanged} unchanged -> {self.out_dir}"
        )


class _Manifest:
    def __init__(self, path: Path, dataset: str):
        self.path = path
        self.dataset = dataset
        self.tasks: dict[str, dict] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}  # an unreadable manifest only costs a full (byte-comparing) rerun
            if data.get("version") == _MANIFEST_VERSION and data.get("dataset") == dataset:
                self.tasks = data.get("tasks", {})

    def is_done(self, task: Task, out_dir: Path) -> bool:
        entry = self.tasks.get(task.key)
        if entry is None or entry["sources"] != [s.signature() for s in task.sources]:
            return False
        for name, size in entry["outputs"].items():
            path = out_dir / name
            if not path.is_file() or path.stat().st_size != size:
                return False
        return True

    def record(self, task: Task, outputs: dict[str, int]) -> None:
        self.tasks[task.key] = {"sources": [s.signature() for s in task.sources], "outputs": outputs}

    def save(self) -> None:
        payload = {"version": _MANIFEST_VERSION, "dataset": self.dataset, "tasks": self.tasks}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(payload))
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error}", hint="check that OUT_DIR is writable") from error


def run_tasks(dataset: str, out_dir: Path, tasks: Sequence[Task], *, progress: bool = True) -> ConversionSummary:
    """Run ``tasks`` into ``out_dir``, skipping finished ones; a tqdm bar shows on a terminal when ``progress``."""
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{dataset}: duplicate conversion task keys")
    manifest = _Manifest(out_dir / f".coninfer-convert-{dataset}.json", dataset)
    skipped = written = unchanged = 0
    bar = tqdm(tasks, desc=f"convert {dataset}", unit="file", disable=not (progress and sys.stderr.isatty()))
    try:
        for done, task in enumerate(bar, start=1):
            if manifest.is_done(task, out_dir):
                skipped += 1
                continue
            outputs = {}
            for path, data in task.produce():
                if write_if_changed(path, data):
                    written += 1
                else:
                    unchanged += 1
                outputs[path.relative_to(out_dir).as_posix()] = len(data)
            manifest.record(task, outputs)
            if done % _FLUSH_EVERY == 0:
                manifest.save()
    finally:
        bar.close()
        manifest.save()
    return ConversionSummary(dataset, out_dir, len(tasks), skipped, written, unchanged)
