"""Fixtures of the recorder tests: a gateway simulator on loopback and a recording over it."""

from __future__ import annotations

import pytest

from ibstream.simulator.gateway import GatewaySimulator
from tests.recorder.harness import Recording, ib_settings


@pytest.fixture
def gateway():
    with GatewaySimulator(speed=40, send_interval=0.005) as sim:
        yield sim


@pytest.fixture
def recording(tmp_path, gateway):
    running = Recording(ib_settings(tmp_path, gateway), gateway)
    yield running
    running.close()
