from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with default settings, shared by the tests of one module."""
    g = Gateway(tmp_path_factory.mktemp("gw") / "data").start()
    yield g
    g.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of the test's own, for tests that kill or restart it."""
    g = Gateway(tmp_path / "data")
    yield g
    g.stop()
