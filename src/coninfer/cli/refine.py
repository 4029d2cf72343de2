"""`coninfer refine`: run the context solver on any model's prior, from an .npz file to an .npz file."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import click
import numpy as np

from coninfer._fs import atomic_path, write_error
from coninfer.errors import InputError, InputFileError, OutputError

EXAMPLES = """
\b
Examples:
  coninfer refine scene_prior.npz -o scene_refined.npz
  coninfer refine scene_prior.npz -o scene_refined.npz --temperature 150 --overwrite
"""


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def _check_is_npz(path: Path) -> None:
    """Refuse anything that is not a zip archive before numpy sees it: np.load would take any other bytes for a
    pickle and talk about pickled data, which is not the user's problem."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
    except OSError as error:
        raise InputFileError(f"cannot read {path}: {error.strerror or error}", hint="check the file's permissions") from error
    if head.startswith(_ZIP_MAGICS):
        return
    if head.startswith(_NPY_MAGIC):
        what = "a single .npy array"
    elif not head:
        what = "empty"
    else:
        what = "not a zip archive"
    raise InputError(f"{path} is not an .npz archive ({what})",
                     hint="save logits and features with numpy.savez(path, logits=..., features=...)")


def _load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` (N, K) and ``features`` (N, D) from an .npz archive."""
    _check_is_npz(path)
    try:
        archive = np.load(path, allow_pickle=False)
        with archive:
            missing = [name for name in ("logits", "features") if name not in archive.files]
            if missing:
                raise InputError(
                    f"{path} has no array named {' or '.join(missing)} (it holds: {', '.join(archive.files) or 'nothing'})",
                    hint="store logits (N, K) and features (N, D) under those names",
                )
            return archive["logits"], archive["features"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # zlib: damaged compressed npz
        if isinstance(error, InputError):
            raise
        raise InputFileError(f"cannot read {path} as .npz: {error}", hint="check that the file is a numpy .npz") from error


def _check_solver_options(temperature: float, iterations: int, prior_scale: float) -> None:
    """The options by their command-line names (the solver would name its own parameters)."""
    for option, value, default in (("--temperature", temperature, 50), ("--prior-scale", prior_scale, 100)):
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{option} must be a finite number > 0, got {value}", hint=f"e.g. {option} {default}")
    if iterations < 0:
        raise InputError(f"--iterations must be >= 0, got {iterations}", hint="pass e.g. --iterations 10")


def _check_paths(input_path: Path, output: Path, overwrite: bool) -> None:
    if not input_path.is_file():
        raise InputFileError(f"input file not found: {input_path}", hint="check the path")
    if output.resolve() == input_path.resolve():
        raise OutputError(f"output {output} is the input file", hint="choose another output path")
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists", hint="pass --overwrite or choose another path")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist", hint="create it first")


def _write_atomically(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz to a temporary file beside ``output``, then rename it, so no partial file is ever left."""
    with atomic_path(output) as temporary:
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
        except OSError as error:
            raise write_error(output, error) from error


@click.command("refine", epilog=EXAMPLES)
@click.argument("input_path", metavar="INPUT.npz", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
    help="Output .npz: probs (N, K) float32 and labels (N,) int64.",
)
@click.option("--temperature", default=50.0, help="Likelihood temperature, > 0 (150 for iSAID). Default: 50.")
@click.option("--iterations", default=10, help="Number of mean/variance updates, >= 0. Default: 10.")
@click.option("--prior-scale", default=100.0, help="Factor on the logits inside the prior softmax. Default: 100.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output. Default: refuse.")
def refine(input_path: Path, output: Path, temperature: float, iterations: int, prior_scale: float, overwrite: bool) -> None:
    """Refine a per-patch prior with the ConInfer context solver.

    INPUT.npz holds `logits` (N, K), the prior's patch/query similarities, and `features` (N, D), L2-normalised
    patch features. The output holds the refined soft assignment `probs` (N, K) and `labels` = its argmax.
    """
    from coninfer.solver import refine as run_solver

    _check_solver_options(temperature, iterations, prior_scale)
    _check_paths(input_path, output, overwrite)
    logits, features = _load_inputs(input_path)
    probs = run_solver(logits, features, temperature=temperature, iterations=iterations, prior_scale=prior_scale)
    labels = np.argmax(probs, axis=1).astype(np.int64)
    _write_atomically(output, {"probs": probs.astype(np.float32), "labels": labels})
    click.echo(f"wrote {output}: {probs.shape[0]} patches, {probs.shape[1]} queries")
