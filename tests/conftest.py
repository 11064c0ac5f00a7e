"""Shared fixtures: the real data beside the project and small phantom studies."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_CASES = ("case-11", "case-20", "case-25")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read in place, never copied)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; the project expects ../shared beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ivd_dir(shared_data: Path) -> Path:
    return shared_data / "ivd-t2-mri"


@pytest.fixture(scope="session")
def spider_dir(shared_data: Path) -> Path:
    return shared_data / "spider-format"
