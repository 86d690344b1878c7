"""Fixtures of the flow tests: one temporary Prefect server shared by the whole session."""

from __future__ import annotations

import prefect.main  # noqa: F401 - Prefect's logging set up on the real stderr, not a CliRunner's
import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session."""
    with prefect_test_harness(server_startup_timeout=180):
        yield
