"""Shared fixtures: where the golden data lives, and whether its absence is an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONINFER_SHARED", ROOT.parent / "shared"))


def require_shared(subfolder: str) -> Path:
    """Path of ``../shared/<subfolder>``; skip (or fail when CONINFER_REQUIRE_SHARED=1) if it is absent."""
    path = SHARED / subfolder
    if path.is_dir():
        return path
    message = f"{path} not found: golden parity data lives in ../shared next to the repository"
    if os.environ.get("CONINFER_REQUIRE_SHARED") == "1":
        pytest.fail(message + " and CONINFER_REQUIRE_SHARED=1 demands it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared("golden")


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return require_shared("spec")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> Path:
    """No network and an empty Hugging Face cache (the constants are read at import, so patch them too)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home
