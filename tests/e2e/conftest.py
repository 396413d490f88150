"""The end-to-end tier (`make test-e2e`): the README's commands as a user runs them, in subprocesses
(`python train.py ...`, torchrun, `sample.py`, `evaluate.py`), and tests that need several processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import default_timeout

TIMEOUT_S = 900  # per test, fixtures included (pytest-timeout); a test's own timeout marker wins


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    default_timeout(items, Path(__file__).parent, TIMEOUT_S)
