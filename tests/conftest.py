"""Fixtures that start real components: a store in a temp folder, a Flight server on loopback."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import urllib.request
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


class S3Server:
    """moto's S3-compatible server on loopback with a fresh bucket, behind a :class:`FaultProxy`."""

    def __init__(self, bucket: str = "ticks"):
        from moto.server import ThreadedMotoServer

        from tests.faultproxy import FaultProxy

        self.bucket = bucket
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.endpoint = f"{host}:{port}"
        self.proxy = FaultProxy((host, port))
        urllib.request.urlopen(urllib.request.Request(f"http://{self.endpoint}/moto-api/reset", method="POST"))
        self.client().create_bucket(Bucket=bucket)  # moto's state is per process: reset, then a fresh bucket

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def url(self, prefix: str = "ibstream", *, direct: bool = False) -> str:
        """The archive_url of ``prefix`` in the bucket (through the fault proxy unless ``direct``)."""
        endpoint = self.endpoint if direct else f"127.0.0.1:{self.proxy.port}"
        return f"s3://test:test@{self.bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def close(self) -> None:
        self.proxy.close()
        self._moto.stop()


@pytest.fixture
def s3():
    """A real S3-compatible server (moto in server mode) on loopback, with a fault-injecting proxy."""
    server = S3Server()
    try:
        yield server
    finally:
        server.close()
