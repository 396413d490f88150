"""The unit tier (`make test-fast`): no training run, no job run, no subprocess; the whole tier runs in under
2 minutes on 2 CPU cores. A test that fits a Trainer or calls a job function belongs in tests/integration/."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import default_timeout

TIMEOUT_S = 60  # per test, fixtures included (pytest-timeout); a test's own timeout marker wins


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    default_timeout(items, Path(__file__).parent, TIMEOUT_S)
