"""Fixtures for the data tests: the embedded default dataset (built once per session) and a
synthetic shard of known documents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # data_test_helpers, under any --import-mode
from data_test_helpers import make_documents, write_shard  # noqa: E402


@pytest.fixture(scope="session")
def default_dataset(tmp_path_factory):
    from data import ensure_default_dataset

    return ensure_default_dataset(tmp_path_factory.mktemp("default-cache"))


@pytest.fixture
def synthetic_shard(tmp_path):
    docs = make_documents(200, seed=0)
    return write_shard(tmp_path / "synthetic", docs), docs
