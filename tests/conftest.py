"""Fixtures shared by unit and integration tests (helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIGS, TINY_DATA, TINY_MODEL


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides pointing at a prepared tiny data dir (prepared once per session)."""
    from data_pipelines.prepare import prepare
    from lmtrain.config import load_config

    data_dir = tmp_path_factory.mktemp("data") / "stdlib-512"
    overrides = [*TINY_DATA, f"data.dir={data_dir}"]
    prepare(load_config(CONFIGS / "debug.yaml", overrides).data, log=lambda s: None)
    return overrides


@pytest.fixture
def tiny_cfg(tiny_data):
    from lmtrain.config import load_config

    def make(*extra: str):
        return load_config(CONFIGS / "debug.yaml", [*tiny_data, *TINY_MODEL, *extra])

    return make
