"""The work folders of scene runs, as ``coninfer cache list|clear`` shows and frees them.

A work folder (``$CONINFER_CACHE/work/<key>``, or under ``--workdir``) holds one scene's class-independent
embeddings (:class:`~coninfer.store.EmbeddingStore`) and, in ``queries/``, the class-dependent store of each
unfinished or kept run; ``about.json`` says which input and models it belongs to. A folder in use by a run is
locked and is never cleared.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coninfer import _fs
from coninfer.errors import InputError, OutputError
from coninfer.store import EmbeddingStore, _from_ranges

ABOUT = "about.json"


@dataclass(frozen=True)
class WorkFolder:
    """One work folder: ``tiles_done`` of ``tiles`` embedded (or found empty), its query stores, its size."""

    path: Path
    input: str | None
    models: str | None
    tiles: int | None
    tiles_done: int
    query_stores: int
    size_bytes: int
    modified: float

    @property
    def name(self) -> str:
        return self.path.name


def work_root(workdir: str | Path | None = None) -> Path:
    """``workdir``, or the coninfer cache's ``work`` folder (where ``segment`` puts its stores by default)."""
    return Path(workdir) if workdir else _fs.cache_dir() / "work"


def write_about(folder: Path, *, input_path: str, models: dict, tiles: int) -> None:
    """Describe ``folder`` for ``coninfer cache list`` (input, model names, tile count)."""
    names = " + ".join(str(entry["name"]) for entry in models.values() if entry)
    _fs.atomic_write_text(folder / ABOUT, json.dumps({"input": input_path, "models": names, "tiles": tiles}))


def list_work_folders(root: Path) -> list[WorkFolder]:
    """Every work folder under ``root``, most recently used first; none when ``root`` does not exist."""
    if not root.is_dir():
        return []
    folders = [_describe(path) for path in root.iterdir() if path.is_dir() and not path.is_symlink()]
    return sorted(folders, key=lambda folder: folder.modified, reverse=True)


def clear_work_folders(root: Path, names: list[str] | None = None, *, older_than_days: float | None = None
                       ) -> tuple[list[WorkFolder], list[WorkFolder]]:
    """Delete the work folders ``names`` (default: all) not used for ``older_than_days``; folders locked by a
    running run are skipped. Returns (deleted, skipped because in use)."""
    folders = list_work_folders(root)
    if names:
        unknown = sorted(set(names) - {folder.name for folder in folders})
        if unknown:
            raise InputError(f"no work folder {', '.join(unknown)} in {root}",
                             hint="see `coninfer cache list` for the folder names")
        folders = [folder for folder in folders if folder.name in names]
    if older_than_days is not None:
        limit = time.time() - older_than_days * 86400
        folders = [folder for folder in folders if folder.modified < limit]
    deleted, busy = [], []
    for folder in folders:
        try:
            with _fs.locked_folder(folder.path):
                shutil.rmtree(folder.path)
            deleted.append(folder)
        except OutputError:
            busy.append(folder)
    return deleted, busy


def _describe(path: Path) -> WorkFolder:
    about = _read_json(path / ABOUT)
    done: set[int] = set()
    for record in path.glob(f"{EmbeddingStore.RECORD}-*.json"):
        payload = _read_json(record)
        # a damaged record: the next run on this folder says so; listing it is enough here
        with contextlib.suppress(TypeError, ValueError):
            done |= _from_ranges(payload.get("encoded", [])) | _from_ranges(payload.get("empty", []))
    files = [entry for entry in path.rglob("*") if entry.is_file()]
    size = sum(entry.stat().st_blocks * 512 for entry in files)  # allocated bytes: the stores are sparse
    modified = max([entry.stat().st_mtime for entry in files] + [path.stat().st_mtime])
    queries = path / "queries"
    return WorkFolder(path, about.get("input"), about.get("models"), about.get("tiles"), len(done),
                      sum(1 for entry in queries.iterdir() if entry.is_dir()) if queries.is_dir() else 0,
                      size, modified)


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def age(modified: float) -> str:
    seconds = max(0.0, time.time() - modified)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"


__all__ = ["WorkFolder", "clear_work_folders", "list_work_folders", "work_root", "write_about"]
