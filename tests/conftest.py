"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pathlib

import pytest
import torch


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    """The repository's root folder (the one holding pyproject.toml), computed once here."""
    return pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared, loaded CPU, two threads made the
    training runs ~20x slower (and one thread makes them reproducible anywhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
