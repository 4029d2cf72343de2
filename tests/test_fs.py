"""The one file-writing scheme: atomic moves, recognisable temporaries, stale-temporary cleanup, output checks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coninfer._fs import (
    TEMP_MARK,
    atomic_path,
    atomic_write_text,
    cache_dir,
    check_output_path,
    is_virtual_path,
    remove_stale_temporaries,
    temporary_name,
    write_error,
)
from coninfer.errors import OutputError


class TestAtomicPath:
    def test_moves_into_place_only_when_complete(self, tmp_path: Path) -> None:
        target = tmp_path / "out.tif"
        with atomic_path(target) as temporary:
            temporary.write_text("data")
            assert not target.exists() and TEMP_MARK in temporary.name and temporary.suffix == ".tif"
        assert target.read_text() == "data" and list(tmp_path.iterdir()) == [target]

    @pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
    def test_removes_the_temporary_on_any_exit(self, tmp_path: Path, error: type[BaseException]) -> None:
        target = tmp_path / "out.json"
        target.write_text("old")
        with pytest.raises(error), atomic_path(target) as temporary:
            temporary.write_text("new")
            raise error()
        assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]

    def test_disk_full_is_one_line(self) -> None:
        error = write_error("/x/out.tif", OSError(errno.ENOSPC, "No space left on device"))
        assert isinstance(error, OutputError) and "no space left" in str(error) and "\n" not in str(error)

    def test_write_text(self, tmp_path: Path) -> None:
        atomic_write_text(tmp_path / "a.txt", "é")
        assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é"


class TestStaleTemporaries:
    def test_removes_only_dead_processes_files_of_the_named_outputs(self, tmp_path: Path) -> None:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        pid = int(dead.stdout)
        stale = tmp_path / f".out.tif.{pid}-0123abcd{TEMP_MARK}.tif"
        other = tmp_path / f".other.tif.{pid}-0123abcd{TEMP_MARK}.tif"
        mine = temporary_name(tmp_path / "out.tif")
        for path in (stale, other, mine):
            path.write_text("x")
        assert remove_stale_temporaries(tmp_path, ["out.tif"]) == [stale]
        assert other.exists() and mine.exists() and not stale.exists()


class TestCheckOutputPath:
    def test_existing_needs_overwrite(self, tmp_path: Path) -> None:
        (tmp_path / "a.tif").write_text("x")
        with pytest.raises(OutputError, match="--overwrite"):
            check_output_path(tmp_path / "a.tif", overwrite=False)
        assert check_output_path(tmp_path / "a.tif", overwrite=True) == tmp_path / "a.tif"

    def test_input_missing_folder_and_folder(self, tmp_path: Path) -> None:
        with pytest.raises(OutputError, match="is the input"):
            check_output_path(tmp_path / "a.tif", overwrite=True, inputs=[tmp_path / "a.tif"])
        with pytest.raises(OutputError, match="does not exist"):
            check_output_path(tmp_path / "no" / "a.tif", overwrite=False)
        with pytest.raises(OutputError, match="is a folder"):
            check_output_path(tmp_path, overwrite=True)

    def test_virtual_inputs_are_not_resolved(self, tmp_path: Path) -> None:
        assert is_virtual_path("/vsizip/a.zip/b.tif") and is_virtual_path("https://h/x.tif")
        assert not is_virtual_path(tmp_path / "a.tif")
        check_output_path(tmp_path / "a.tif", overwrite=False, inputs=["/vsicurl/https://h/a.tif"])


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONINFER_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CONINFER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "coninfer"
    assert os.sep in str(cache_dir())


class TestHoldOutputs:
    def test_a_second_holder_is_refused_even_in_one_process(self, tmp_path: Path) -> None:
        from coninfer._fs import hold_outputs

        target = tmp_path / "classes.tif"
        refused = pytest.raises(OutputError, match=rf"another run \(process {os.getpid()}\) is writing .*classes")
        with hold_outputs([target, tmp_path / "classes.json"]), refused, hold_outputs([target]):
            pass
        with hold_outputs([target]):  # released: free again, and no lock file left behind
            pass
        assert list(tmp_path.iterdir()) == []

    def test_another_process_holding_it_is_named(self, tmp_path: Path) -> None:
        from coninfer._fs import hold_outputs

        target = tmp_path / "classes.tif"
        code = (f"import sys, time; from coninfer._fs import hold_outputs\n"
                f"with hold_outputs([{str(target)!r}]):\n    print('held', flush=True); sys.stdin.readline()")
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout.readline().strip() == "held"  # blocks until the child holds the lock
            with pytest.raises(OutputError, match=f"process {child.pid}"), hold_outputs([target]):
                pass
        finally:
            child.communicate("\n", timeout=60)
        with hold_outputs([target]):
            pass


def test_stale_temporaries_of_temporaries_and_their_gdal_sidecars(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    staged = f".out.tif.{pid}-0123abcd{TEMP_MARK}.tif"
    names = [staged, f".{staged}.{pid}-89abcdef{TEMP_MARK}.stage.tif", f"{staged}.msk.ovr.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path, ["out.tif"])) == sorted(names)
    assert list(tmp_path.iterdir()) == []
