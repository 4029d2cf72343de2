"""Tests for `coninfer refine` through the click group (one-line errors, exit code 2, atomic output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coninfer.cli import main
from coninfer.solver import refine


def _problem(num_patches: int = 120, num_queries: int = 4, num_features: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(num_patches, num_features)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    logits = rng.uniform(0.1, 0.3, size=(num_patches, num_queries)).astype(np.float32)
    return {"logits": logits, "features": features}


@pytest.fixture
def input_npz(tmp_path: Path) -> Path:
    path = tmp_path / "prior.npz"
    np.savez(path, **_problem())
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["refine", *args])


def test_writes_probs_and_labels(input_npz: Path, tmp_path: Path) -> None:
    output = tmp_path / "refined.npz"
    result = _run(str(input_npz), "-o", str(output), "--temperature", "150", "--iterations", "3")
    assert result.exit_code == 0, result.output
    arrays = _problem()
    expected = refine(arrays["logits"], arrays["features"], temperature=150, iterations=3)
    with np.load(output, allow_pickle=False) as saved:
        assert saved["probs"].dtype == np.float32 and saved["labels"].dtype == np.int64
        np.testing.assert_array_equal(saved["probs"], expected)
        np.testing.assert_array_equal(saved["labels"], expected.argmax(axis=1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prior.npz", "refined.npz"]  # no temp file left


def test_overwrite_replaces_existing_output(input_npz: Path, tmp_path: Path) -> None:
    output = tmp_path / "refined.npz"
    output.write_bytes(b"old")
    result = _run(str(input_npz), "-o", str(output), "--overwrite")
    assert result.exit_code == 0, result.output
    with np.load(output, allow_pickle=False) as saved:
        assert saved["probs"].shape == (120, 4)


def test_help_gives_defaults() -> None:
    result = CliRunner().invoke(main, ["refine", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps lines
    for default in ("Default: 50.", "Default: 10.", "Default: 100.", "Default: refuse."):
        assert default in text


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """Input files that must be refused, by case name."""
    arrays = _problem()
    files = {"missing": tmp_path / "missing.npz"}
    files["not_npz"] = tmp_path / "text.npz"
    files["not_npz"].write_text("not a zip")
    files["empty"] = tmp_path / "empty.npz"
    files["empty"].write_bytes(b"")
    files["npy"] = tmp_path / "plain.npy"
    np.save(files["npy"], arrays["logits"])
    files["npy_named_npz"] = tmp_path / "array.npz"
    files["npy_named_npz"].write_bytes(files["npy"].read_bytes())
    files["missing_array"] = tmp_path / "no_features.npz"
    np.savez(files["missing_array"], logits=arrays["logits"])
    files["wrong_shape"] = tmp_path / "one_d.npz"
    np.savez(files["wrong_shape"], logits=arrays["logits"][:, 0], features=arrays["features"])
    files["row_mismatch"] = tmp_path / "rows.npz"
    np.savez(files["row_mismatch"], logits=arrays["logits"][:-1], features=arrays["features"])
    files["nan"] = tmp_path / "nan.npz"
    logits = arrays["logits"].copy()
    logits[3, 1] = np.nan
    np.savez(files["nan"], logits=logits, features=arrays["features"])
    files["pickled"] = tmp_path / "pickled.npz"
    np.savez(files["pickled"], logits=np.array([{"a": 1}], dtype=object), features=arrays["features"])
    files["corrupt_deflate"] = tmp_path / "corrupt.npz"
    np.savez_compressed(files["corrupt_deflate"], **arrays)
    _damage_deflate_stream(files["corrupt_deflate"], "features.npy")
    return files


def _damage_deflate_stream(path: Path, member: str) -> None:
    """Overwrite the start of ``member``'s compressed data with a reserved deflate block type (zlib.error)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start] = 0x07  # BFINAL=1, BTYPE=11 (reserved): "invalid block type"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "not found"),
        ("not_npz", "is not an .npz archive (not a zip archive)"),
        ("empty", "is not an .npz archive (empty)"),
        ("npy", "is not an .npz archive (a single .npy array)"),
        ("npy_named_npz", "is not an .npz archive (a single .npy array)"),
        ("missing_array", "no array named features"),
        ("wrong_shape", "2-D"),
        ("row_mismatch", "rows"),
        ("nan", "NaN"),
        ("pickled", "cannot read"),
        ("corrupt_deflate", "cannot read"),
    ],
)
def test_bad_input_file(tmp_path: Path, case: str, message: str) -> None:
    source = _bad_inputs(tmp_path)[case]
    output = tmp_path / "out" / "refined.npz"
    output.parent.mkdir()
    result = _run(str(source), "-o", str(output))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.stderr
    if case != "pickled":  # numpy takes any non-zip bytes for a pickle: that must not reach the user
        assert "pickle" not in lines[0]
    assert list(output.parent.iterdir()) == []  # no output, no temporary file


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "0"], "--temperature must be"),
        (["--temperature", "nan"], "--temperature must be"),
        (["--iterations", "-1"], "--iterations must be"),
        (["--prior-scale", "-5"], "--prior-scale must be"),
        (["--prior-scale", "inf"], "--prior-scale must be"),
    ],
)
def test_bad_settings(input_npz: Path, tmp_path: Path, options: list[str], message: str) -> None:
    output = tmp_path / "refined.npz"
    result = _run(str(input_npz), "-o", str(output), *options)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "solver." not in lines[0] and "prior_scale" not in lines[0]  # the option's name, not the parameter's
    assert not output.exists()


def test_existing_output_is_kept_without_overwrite(input_npz: Path, tmp_path: Path) -> None:
    output = tmp_path / "refined.npz"
    output.write_bytes(b"keep me")
    result = _run(str(input_npz), "-o", str(output))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert output.read_bytes() == b"keep me"


def test_output_may_not_be_the_input(input_npz: Path) -> None:
    before = input_npz.read_bytes()
    result = _run(str(input_npz), "-o", str(input_npz), "--overwrite")
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert input_npz.read_bytes() == before


def test_output_folder_must_exist(input_npz: Path, tmp_path: Path) -> None:
    result = _run(str(input_npz), "-o", str(tmp_path / "nowhere" / "refined.npz"))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()
