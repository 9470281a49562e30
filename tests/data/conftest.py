"""Fixtures for the data tests: the embedded default dataset (built once per session) and a
synthetic shard of known documents."""

from __future__ import annotations

import pytest

from tests.helpers.data import make_documents, write_shard


@pytest.fixture(scope="session")
def default_dataset(tmp_path_factory):
    from data import ensure_default_dataset

    return ensure_default_dataset(tmp_path_factory.mktemp("default-cache"))


@pytest.fixture
def synthetic_shard(tmp_path):
    docs = make_documents(200, seed=0)
    return write_shard(tmp_path / "synthetic", docs), docs
