"""Fixtures shared by the reliability tests (resume, signals)."""

import pytest


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder per session for the reliability runs, so the reference run is trained once."""
    path = tmp_path_factory.getbasetemp() / "reliability"
    path.mkdir(exist_ok=True)
    return path
