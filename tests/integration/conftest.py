"""The integration tier (`make test-integration`): in-process runs of the jobs (`run_training`,
`run_sampling`, `run_extraction`, `run_evaluation`, `export`, the entry points through `tests/entries.py`), called as
functions with a composed config; and the checks too long for the unit tier's 2 minutes (every selectable config
against the golden file, whole sampler loops, the aMUSEd pipeline, Inception features). A test that starts a process
belongs in tests/e2e/."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import default_timeout

TIMEOUT_S = 600  # per test, fixtures included (pytest-timeout); a test's own timeout marker wins


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    default_timeout(items, Path(__file__).parent, TIMEOUT_S)
