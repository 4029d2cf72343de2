"""The one error hierarchy of coninfer.

Every error a user can cause derives from :class:`ConInferError` and also from the built-in it resembles, so
callers may catch either. The CLI prints ``str(error)`` (one line) plus ``error.hint`` and exits with code 2.
"""

from __future__ import annotations


class ConInferError(Exception):
    """Root of every coninfer error. ``hint`` says what to do next."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message


class InputError(ConInferError, ValueError):
    """Bad user input: a value, a shape, a file's content."""


class InputFileError(ConInferError, FileNotFoundError):
    """An input file is missing or cannot be read."""


class OutputError(ConInferError, OSError):
    """An output cannot be written (exists without --overwrite, unwritable folder, same as input)."""


class ModelLoadError(ConInferError, RuntimeError):
    """A model or checkpoint cannot be found, downloaded, parsed or converted."""


class CheckpointFormatError(ModelLoadError):
    """A checkpoint's keys or shapes do not match what the target model needs."""


class CompileError(ConInferError, RuntimeError):
    """torch.compile (``--compile``) is unavailable here or failed on a model."""


class ResourceError(ConInferError, MemoryError):
    """The machine cannot hold the work (e.g. one tile does not fit in GPU memory)."""
