"""Fixtures that start real components: a store in a temp folder, a Flight server on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from ibstream.clients import Client
from ibstream.settings import Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.storage import Store
from tests.helpers import Served


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs, if this process may mount one (root; CI may not allow it: then the test skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full filesystem needs root to mount an 8 MB tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def gateway():
    """The IB Gateway simulator on a free loopback port (markets 40x real speed)."""
    with GatewaySimulator(speed=40, send_interval=0.005) as sim:
        yield sim


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_root=tmp_path / "data",
        rotation_interval=timedelta(minutes=5),
        archive_delay=timedelta(0),
        flight_port=0,
        fsync="none",
    )


@pytest.fixture
def store(settings: Settings):
    with Store(settings) as opened:
        yield opened


@pytest.fixture
def served(store: Store):
    running = Served(store)
    yield running
    running.close()


@pytest.fixture
def client(served: Served) -> Client:
    return served.client
