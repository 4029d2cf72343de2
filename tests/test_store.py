"""Tests of coninfer.store: checksummed tile files, the store's records, several writers, the work-folder lock."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from coninfer.errors import ConInferError, OutputError
from coninfer.store import (
    STORE_VERSION,
    StoreCorruptError,
    TileFile,
    TileStore,
    clear_folder,
    describe_tiles,
    locked_folder,
)

TILES, PATCHES, QUERIES, DIM = 6, 4, 2, 3
ARRAYS = ["logits.f32", "features.f16", "valid.u8", "z.f32"]


def _data(tiles: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits (n, P, K), features (n, P, D), valid (n, P) for ``tiles``, distinct per tile and seed."""
    rng = np.random.default_rng([seed, *tiles])
    count = len(tiles)
    return (rng.normal(size=(count, PATCHES, QUERIES)).astype(np.float32),
            rng.normal(size=(count, PATCHES, DIM)).astype(np.float32),
            rng.integers(0, 2, (count, PATCHES)).astype(np.uint8))


def _open(folder: Path, **kwargs) -> TileStore:
    return TileStore(folder, TILES, PATCHES, QUERIES, **kwargs)


FILLED = [0, 2, 3, 4, 5]


def _filled(folder: Path, *, solved: bool = True) -> None:
    """A finished single-writer store: every tile encoded but tile 1 (empty); z written and solved."""
    with _open(folder) as store:
        tiles = FILLED
        store.put(tiles, *_data(tiles))
        store.commit(TILES, [1])
        if solved:
            store.z[tiles] = np.full((len(tiles), PATCHES, QUERIES), 0.5, np.float32)
            store.commit(TILES, solved=True)


def _overwrite(path: Path, offset: int, data: bytes = b"\x5a\xa5") -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


class TestTileFile:
    """Tile records by offset, each checked against its checksum when read."""

    def test_round_trip_in_any_order(self, tmp_path: Path) -> None:
        array = TileFile(tmp_path / "a.f32", np.float32, (6, 4, 3), create=True)
        values = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
        array[[5, 0, 1, 3]] = values  # runs (5), (0, 1), (3)
        np.testing.assert_array_equal(array[[0, 1]], values[1:3])
        np.testing.assert_array_equal(array[5], values[0])
        np.testing.assert_array_equal(array[[3, 5]], values[[3, 0]])
        assert array[[0, 1]].flags.writeable
        assert array[[]].shape == (0, 4, 3)

    def test_reopening_keeps_data_and_create_clears_it(self, tmp_path: Path) -> None:
        path = tmp_path / "b.u8"
        TileFile(path, np.uint8, (2, 5), create=True)[1] = np.full(5, 7, np.uint8)
        np.testing.assert_array_equal(TileFile(path, np.uint8, (2, 5))[1], 7)
        cleared = TileFile(path, np.uint8, (2, 5), create=True)
        assert cleared.checksums([0, 1]).tolist() == [0, 0]
        assert cleared.damaged([0, 1]) == [0, 1]

    @pytest.mark.parametrize("index", [-1, 2, [1, 2]])
    def test_out_of_range_is_an_error(self, tmp_path: Path, index) -> None:
        array = TileFile(tmp_path / "c.f32", np.float32, (2, 3), create=True)
        with pytest.raises(IndexError):
            array[index]
        with pytest.raises(IndexError):
            array[index] = np.zeros((1 if isinstance(index, int) else 2, 3), np.float32)

    def test_a_tile_never_written_is_not_read(self, tmp_path: Path) -> None:
        array = TileFile(tmp_path / "d.f32", np.float32, (3, 2))
        array[0] = np.ones(2, np.float32)
        with pytest.raises(StoreCorruptError, match=r"d\.f32 fails its checksum at tile\(s\) 2"):
            array[[0, 2]]
        assert array.checksums([0, 1]).tolist()[1] == 0 and array.checksums([0])[0] != 0

    def test_a_damaged_record_is_found_on_read_and_by_damaged(self, tmp_path: Path) -> None:
        path = tmp_path / "e.f32"
        TileFile(path, np.float32, (4, 2))[[0, 1, 2, 3]] = np.ones((4, 2), np.float32)
        _overwrite(path, 1 * 8 + 2)  # inside tile 1's record (8 bytes per tile)
        _overwrite(path.with_name("e.f32.crc"), 3 * 8)  # tile 3's checksum slot
        array = TileFile(path, np.float32, (4, 2))
        assert array.damaged(range(4)) == [1, 3]
        np.testing.assert_array_equal(array[[0, 2]], 1)
        with pytest.raises(StoreCorruptError) as error:
            array[[0, 1, 2, 3]]
        assert error.value.tiles == [1, 3] and "1, 3" in str(error.value)

    def test_a_truncated_file_fails_its_checks(self, tmp_path: Path) -> None:
        path = tmp_path / "f.u8"
        TileFile(path, np.uint8, (4, 8))[[0, 1, 2, 3]] = np.full((4, 8), 3, np.uint8)
        os.truncate(path, 2 * 8 + 3)
        array = TileFile(path, np.uint8, (4, 8))
        assert array.damaged(range(4)) == [2, 3]
        assert path.stat().st_size == 4 * 8  # resized, so the lost tiles can be written again
        array[[2, 3]] = np.full((2, 8), 4, np.uint8)
        assert array.damaged(range(4)) == []

    def test_damage_during_a_session_is_found_by_damaged(self, tmp_path: Path) -> None:
        path = tmp_path / "g.f32"
        array = TileFile(path, np.float32, (2, 2))
        array[[0, 1]] = np.ones((2, 2), np.float32)
        _overwrite(path, 0)
        assert array.damaged([0, 1]) == [0]  # read again from disk, whatever was checked before
        with pytest.raises(StoreCorruptError):
            array[0]

    def test_full_disk_is_a_clear_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        array = TileFile(tmp_path / "h.f32", np.float32, (2, 2))

        def no_space(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwrite", no_space)
        with pytest.raises(OutputError, match="cannot write the work store .*No space left") as error:
            array[0] = np.ones(2, np.float32)
        assert "--workdir" in error.value.hint


class TestTileStore:
    def test_progress_and_data_survive_reopening(self, tmp_path: Path) -> None:
        with _open(tmp_path) as store:
            assert store.state == {"version": STORE_VERSION, "next_tile": 0, "empty": [], "feature_dim": None,
                                   "solved": False}
            assert store.features is None and store.missing_tiles() == list(range(TILES))
            logits, features, valid = _data([0, 2])
            store.put([0, 2], logits, features, valid)
            store.commit(3, empty=[1])
        with _open(tmp_path) as reopened:
            assert reopened.state == {"version": STORE_VERSION, "next_tile": 3, "empty": [1], "feature_dim": DIM,
                                      "solved": False}
            assert reopened.resumed_from == 3 and reopened.missing_tiles() == [3, 4, 5]
            assert reopened.encoded_tiles() == [0, 2] and reopened.empty_tiles() == [1]
            np.testing.assert_array_equal(reopened.logits[[0, 2]], logits)
            np.testing.assert_array_equal(reopened.features[[0, 2]], features.astype(np.float16))
            np.testing.assert_array_equal(reopened.valid[2], valid[1])
            assert reopened.verify() == []

    def test_solved_single_writer(self, tmp_path: Path) -> None:
        _filled(tmp_path)
        with _open(tmp_path) as store:
            assert store.state["solved"] and store.solved_contexts() == {0: [0, 2, 3, 4, 5]}
            np.testing.assert_array_equal(store.z[[0, 5]], 0.5)
            assert store.resumed_from == TILES and store.missing_tiles() == []

    def test_storing_a_tile_anew_unsolves_its_context(self, tmp_path: Path) -> None:
        _filled(tmp_path)
        with _open(tmp_path) as store:
            stored = store.logits[[3]], store.features[[3]], store.valid[[3]]
            store.put([3], *_data([3], seed=1))
            assert store.solved_contexts() == {} and not store.state["solved"]
            store.put([3], *stored)  # the same inputs again: the solution holds
            assert store.solved_contexts() == {0: [0, 2, 3, 4, 5]}

    def test_a_context_must_hold_encoded_tiles(self, tmp_path: Path) -> None:
        with _open(tmp_path) as store:
            store.put([0], *_data([0]))
            store.record(encoded=[0])
            with pytest.raises(ValueError, match="context 4 holds tiles not encoded: 1"):
                store.record(solved={4: [0, 1]})
            with pytest.raises(IndexError):
                store.record(encoded=[TILES])

    @pytest.mark.parametrize("name", ARRAYS + [f"{name}.crc" for name in ARRAYS])
    def test_damage_in_any_file_is_found_and_repaired(self, tmp_path: Path, name: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
        _filled(tmp_path)
        size = (tmp_path / name).stat().st_size
        _overwrite(tmp_path / name, size * 3 // 6 + 1)  # inside tile 3's record
        with _open(tmp_path) as store:
            assert store.verify() == [3] and store.verify([0, 2]) == []
            array = {"logits": store.logits, "features": store.features, "valid": store.valid,
                     "z": store.z}[name.split(".")[0]]
            with pytest.raises(StoreCorruptError, match=r"at tile\(s\) 3") as error:
                array[[2, 3]]
            assert str(tmp_path) in str(error.value) and "--no-resume" in error.value.hint
            assert store.repair() == [3]
            assert "1 damaged tile(s) (3): encoding them again" in caplog.text
            assert store.missing_tiles() == [3] and store.solved_contexts() == {}
            store.put([3], *(values[2:3] for values in _data(FILLED)))  # the same inputs as before
            store.record(encoded=[3])
            assert store.solved_contexts() == {}  # its z may be the damaged part: solved again
            store.z[[3]] = np.full((1, PATCHES, QUERIES), 0.5, np.float32)
            store.record(encoded=[3], solved={0: [0, 2, 3, 4, 5]})
            assert store.verify() == [] and store.state["solved"]

    @pytest.mark.parametrize("name", ARRAYS)
    def test_truncated_and_deleted_files(self, tmp_path: Path, name: str) -> None:
        _filled(tmp_path)
        os.truncate(tmp_path / name, (tmp_path / name).stat().st_size * 4 // 6)  # tiles 4 and 5 cut
        with _open(tmp_path) as store:
            assert store.verify() == [4, 5]
        (tmp_path / name).unlink()
        with _open(tmp_path) as store:
            assert store.verify() == [0, 2, 3, 4, 5]

    @pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete", "not json", "list", "version 1"])
    def test_a_damaged_state_file_is_one_line(self, tmp_path: Path, damage: str) -> None:
        _filled(tmp_path)
        state = tmp_path / "state.json"
        text = state.read_text()
        if damage == "overwrite":
            state.write_text(text.replace(f'"num_tiles": {TILES}', f'"num_tiles": {TILES + 1}'))
        elif damage == "truncate":
            state.write_text(text[: len(text) // 2])
        elif damage == "delete":
            state.unlink()
        else:
            state.write_text({"not json": "\x00\x01", "list": "[1, 2]",
                              "version 1": json.dumps({"version": 1, "next_tile": 3})}[damage])
        with pytest.raises(StoreCorruptError) as error:
            _open(tmp_path)
        message = str(error.value)
        assert "\n" not in message and str(tmp_path) in message and "state.json" in message
        assert "--no-resume" in message and isinstance(error.value, ConInferError)
        assert {"overwrite": "state.json fails its checksum", "truncate": "state.json cannot be read",
                "delete": "state.json is missing but progress records exist", "not json": "state.json cannot be read",
                "list": "state.json cannot be read",
                "version 1": f"store version 1, this coninfer reads version {STORE_VERSION}"}[damage] in message

    def test_a_damaged_progress_record_is_one_line(self, tmp_path: Path) -> None:
        _filled(tmp_path)
        _overwrite(tmp_path / "progress-0.json", 5)
        with pytest.raises(StoreCorruptError, match="progress-0.json"):
            _open(tmp_path).missing_tiles()

    def test_another_size_is_refused(self, tmp_path: Path) -> None:
        _open(tmp_path).close()
        with pytest.raises(StoreCorruptError, match="state.json describes a store of"):
            TileStore(tmp_path, TILES, PATCHES, QUERIES + 1)

    def test_records_are_replaced_atomically(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        _filled(tmp_path, solved=False)
        before = (tmp_path / "progress-0.json").read_bytes()

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with _open(tmp_path) as store, monkeypatch.context() as patch:
            patch.setattr(os, "fsync", no_space)
            with pytest.raises(OutputError, match="progress-0.json.*No space left") as error:
                store.record(solved={0: [0]})
            assert "--workdir" in error.value.hint
        assert (tmp_path / "progress-0.json").read_bytes() == before
        assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


class TestSeveralWriters:
    def test_share_covers_the_tiles_in_order(self, tmp_path: Path) -> None:
        tiles = list(range(3, 13))
        shares = [_open(tmp_path, rank=rank, num_ranks=3).share(tiles) for rank in range(3)]
        assert shares == [[3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
        with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
            _open(tmp_path, rank=2, num_ranks=2)

    def test_a_rerun_with_another_writer_count_resumes_the_missing_tiles(self, tmp_path: Path) -> None:
        writers = [_open(tmp_path, rank=rank, num_ranks=2) for rank in range(2)]
        shares = [writer.share(writers[0].missing_tiles()) for writer in writers]
        assert shares == [[0, 1, 2], [3, 4, 5]]
        for step in range(2):  # interleaved batches of one tile; writer 1 finds tile 4 empty
            for writer, share in zip(writers, shares, strict=True):
                tile = share[step]
                if tile == 4:
                    writer.record(empty=[4])
                else:
                    writer.put([tile], *_data([tile]))
                    writer.record(encoded=[tile])
        for writer in writers:
            writer.close()  # killed: tiles 2 and 5 never done
        assert sorted(path.name for path in tmp_path.glob("progress-*.json")) == ["progress-0.json",
                                                                                  "progress-1.json"]
        rerun = [_open(tmp_path, rank=rank, num_ranks=3) for rank in range(3)]
        assert rerun[0].missing_tiles() == [2, 5] and rerun[0].empty_tiles() == [4]
        assert [writer.share(writer.missing_tiles()) for writer in rerun] == [[], [2], [5]]
        for tile, writer in ((2, rerun[1]), (5, rerun[2])):
            writer.put([tile], *_data([tile]))
            writer.record(encoded=[tile])
        rerun[2].z[[0, 1]] = np.zeros((2, PATCHES, QUERIES), np.float32)  # a context solved by writer 2
        rerun[2].record(solved={7: [0, 1]})
        with _open(tmp_path) as store:
            assert store.missing_tiles() == [] and store.encoded_tiles() == [0, 1, 2, 3, 5]
            assert store.solved_contexts() == {7: [0, 1]} and store.verify() == []
            expected = np.concatenate([_data([tile])[0] for tile in (0, 1, 2, 3, 5)])
            np.testing.assert_array_equal(store.logits[[0, 1, 2, 3, 5]], expected)
            store.discard([1, 5])  # reaches every writer's record
            assert store.missing_tiles() == [1, 5] and store.solved_contexts() == {}
        for writer in rerun:
            writer.close()


class TestDescribeTiles:
    def test_ranges_and_limit(self) -> None:
        assert describe_tiles([3, 7, 8, 9]) == "3, 7..9"
        assert describe_tiles(list(range(0, 20, 2)), limit=3) == "0, 2, 4 and 7 more ranges"


class TestLockedFolder:
    def test_one_holder_at_a_time(self, tmp_path: Path) -> None:
        folder = tmp_path / "work" / "key"
        with locked_folder(folder):
            assert folder.is_dir()
            with pytest.raises(OutputError, match="another run is using the work folder") as error, \
                    locked_folder(folder):
                pass
            assert "--workdir" in error.value.hint
        with locked_folder(folder):  # released on exit
            pass

    def test_a_file_system_without_locks_runs_unlocked(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
        import coninfer._fs as fs_module

        def unsupported(*args):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        monkeypatch.setattr(fs_module.fcntl, "flock", unsupported)
        with locked_folder(tmp_path / "key"):
            pass
        assert "cannot lock the work folder" in caplog.text

    def test_an_unwritable_place_is_a_clear_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(OutputError, match="cannot create the work folder") as error, \
                locked_folder(tmp_path / "file" / "key"):
            pass
        assert "--workdir" in error.value.hint


class TestClearFolder:
    def test_empties_the_folder_and_keeps_it(self, tmp_path: Path) -> None:
        (tmp_path / "work" / "sub").mkdir(parents=True)
        _filled(tmp_path / "work")
        with locked_folder(tmp_path / "work"):
            clear_folder(tmp_path / "work")
            assert list((tmp_path / "work").iterdir()) == []
            with _open(tmp_path / "work") as store:
                assert store.missing_tiles() == list(range(TILES))
