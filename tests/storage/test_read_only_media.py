"""A store on read-only media (a mounted snapshot, a DVD) is served as it is: the index opens
immutable, nothing is written, every tick is served."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import io_faults
from ibstream.storage.synthetic import MNQ
from tests.helpers import EVERYTHING, Served, append_in_batches, ticks, utc

CID = MNQ.contract_id


def record(root: Path):
    settings = Settings(data_root=root, rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0),
                        fsync="none", flight_port=0)
    quotes = ticks(utc(2025, 1, 10, 13, 30), 20_000, rate_scale=0.25)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 10, 15, 30))  # some hours archived, the rest in segments
    return settings, quotes


def served_exactly(settings: Settings, quotes) -> None:
    with Store(settings, read_only=True) as store:
        assert store.index.immutable
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        served = Served(store)
        try:
            served_ticks = served.client.tables(CID, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11))["bid_ask"]
            assert served_ticks.equals(quotes)
        finally:
            served.close()


@pytest.fixture
def read_only_mount(tmp_path):
    mount = tmp_path / "media"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and a kernel that allows it (the fault point test runs anyway)")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:  # busy: mapped files
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_store_on_a_read_only_filesystem_is_served(read_only_mount):
    settings, quotes = record(read_only_mount / "data")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    before = sorted((p, p.stat().st_mtime_ns) for p in read_only_mount.rglob("*"))
    served_exactly(settings, quotes)
    assert sorted((p, p.stat().st_mtime_ns) for p in read_only_mount.rglob("*")) == before


def test_read_only_media_by_fault_point(tmp_path):
    settings, quotes = record(tmp_path / "data")
    io_faults.arm("data_root.read_only")
    try:
        served_exactly(settings, quotes)
    finally:
        io_faults.disarm()
    assert not (tmp_path / "data" / "index.sqlite-wal").exists() or \
        (tmp_path / "data" / "index.sqlite-wal").stat().st_size == 0
