"""Files the one way: atomic writes with one temporary-name scheme, output-path checks, the cache folder.

Every file coninfer writes goes to a temporary name next to its target and is moved into place with
``os.replace`` only when complete, so a reader never sees half a file. Temporary names are recognisable
(``.<name>.<pid>-<random>.coninfer-tmp<suffix>``; the suffix is kept so GDAL picks the right driver), removed
on any exception including KeyboardInterrupt, and :func:`remove_stale_temporaries` deletes those of killed runs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from coninfer.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one folder are then the user's to avoid
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_ENV = "CONINFER_CACHE"
TEMP_MARK = ".coninfer-tmp"
# non-greedy: a temporary of a temporary (a COG writer's stage of a staged output) belongs to the first name
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?P<pid>\d+)-[0-9a-f]{8}\.coninfer-tmp")


def cache_dir() -> Path:
    """``$CONINFER_CACHE`` if set, else ``~/.cache/coninfer``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "coninfer"


def temporary_name(path: str | Path) -> Path:
    """The temporary sibling of ``path`` this process writes before moving it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_MARK}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, otherwise delete it.

    Errors of the final move (disk full, permissions) become one-line :class:`OutputError`.
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise write_error(path, error) from error
    finally:  # also on KeyboardInterrupt / SystemExit (signals are turned into SystemExit by the CLI)
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        try:
            temporary.write_bytes(data)
        except OSError as error:
            raise write_error(path, error) from error


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_error(path: str | Path, error: OSError) -> OutputError:
    """A failed write as one line, with the fix for the usual causes."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the device to write {path}",
                           hint="free some disk space or write the outputs to another disk")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied", hint="choose a folder you can write to")
    return OutputError(f"cannot write {path}: {error.strerror or error}", hint="check the output folder")


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete temporary files of ``names`` in ``folder`` left by processes that no longer run (a SIGKILL)."""
    wanted = set(names)
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and match["name"].lstrip(".") in wanted and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_virtual_path(path: str | Path) -> bool:
    """GDAL virtual file systems and URLs, which must not go through pathlib (it collapses ``//``)."""
    text = str(path)
    return text.startswith("/vsi") or "://" in text


def check_output_path(path: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Check that ``path`` may be written; return it as a Path.

    Raises:
        OutputError: the path is one of ``inputs``, is a folder, exists without ``overwrite``, or its folder
            is missing or not writable.
    """
    path = Path(path)
    for source in inputs:
        if not is_virtual_path(source) and Path(source).resolve() == path.resolve():
            raise OutputError(f"output {path} is the input {source}", hint="choose another output path")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist", hint=f"create it first: mkdir -p {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable", hint="choose a folder you can write to")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder", hint="pass a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists", hint="pass --overwrite to replace it")
    return path


LOCK_MARK = ".coninfer-lock"


@contextmanager
def hold_outputs(paths: Iterable[str | Path]) -> Iterator[None]:
    """Hold every output path for the block: a second run (process or thread) that targets one of them stops at
    once with one line naming the run holding it; ``--overwrite`` does not change that. Each path gets an
    flock'ed ``.<name>.coninfer-lock`` beside it (the lock goes with the process; the file is removed on exit,
    and a later run takes over one left by a killed run). Stale temporaries of killed runs are removed too.

    Raises:
        OutputError: another live run holds one of the paths.
    """
    held: list[tuple[int, Path]] = []
    try:
        for path in sorted({Path(p).absolute() for p in paths}):  # one order: two runs cannot deadlock
            lock = path.with_name(f".{path.name}{LOCK_MARK}")
            try:
                handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise write_error(lock, error) from error
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(handle, 64, 0).decode(errors="replace").strip() or "?"
                os.close(handle)
                raise OutputError(f"another run (process {other}) is writing {path}",
                                  hint="wait for it to finish or choose other output paths") from None
            held.append((handle, lock))
            try:
                os.ftruncate(handle, 0)
                os.write(handle, str(os.getpid()).encode())  # so a refused run can name this one
            except OSError as error:  # a full disk: the lock is held all the same, only the pid is missing
                raise write_error(path, error) from error
            remove_stale_temporaries(path.parent, [path.name])
        yield
    finally:
        for handle, lock in reversed(held):
            lock.unlink(missing_ok=True)  # while still locked, so no other run holds a deleted file's lock
            os.close(handle)


@contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and hold an exclusive lock on it for the block, so that two runs (processes or threads)
    never write one store. The lock goes with the process, so a killed run leaves none behind. The writers of
    one run do not lock: the process that starts them holds the lock for them.

    Raises:
        OutputError: another run holds the lock, or the folder cannot be created.
    """
    for _attempt in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = os.open(folder, os.O_RDONLY)
        except OSError as error:
            raise OutputError(f"cannot create the work folder {folder}: {error.strerror or error}",
                              hint="pass --workdir with a writable folder") from error
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise OutputError(f"another run is using the work folder {folder} (same input and settings)",
                              hint="wait for it to finish, or pass another --workdir") from None
        except OSError as error:  # a file system without locks: run unlocked rather than not at all
            logger.warning("cannot lock the work folder %s (%s): two identical runs would share it", folder,
                           error.strerror or error)
        try:
            if os.stat(folder).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)  # the run that held the lock removed the folder meanwhile: lock the new one
    else:
        raise OutputError(f"the work folder {folder} keeps disappearing", hint="pass another --workdir")
    try:
        yield folder
    finally:
        os.close(handle)


def clear_folder(folder: Path) -> None:
    """Delete what ``folder`` holds, keeping the folder itself (and a lock held on it)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
