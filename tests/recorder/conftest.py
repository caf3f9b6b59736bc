"""Fixtures of the recorder tests: a recording over the gateway simulator (``gateway``, tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.recorder.harness import Recording, ib_settings


@pytest.fixture
def recording(tmp_path, gateway):
    running = Recording(ib_settings(tmp_path, gateway), gateway)
    yield running
    running.close()
