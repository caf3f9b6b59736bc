"""Queries stay exact while writing, rotation and archival run concurrently."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import pyarrow as pa

from ibstream.core.times import from_us, hour_floor
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey
from ibstream.storage.synthetic import MNQ
from tests.helpers import between, ticks, utc

CID = MNQ.contract_id


def test_queries_never_see_a_duplicate_or_a_gap_during_rotation_and_archival(store, client):
    table = ticks(utc(2025, 1, 10, 12), 60_000, rate_scale=0.3)  # several hours: archival runs mid-test
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    acked = 0
    done = threading.Event()
    errors: list[str] = []

    def write() -> None:
        nonlocal acked
        for offset in range(0, table.num_rows, 250):
            store.append(CID, "bid_ask", table.slice(offset, 250))
            acked = min(offset + 250, table.num_rows)
            if offset % 5_000 == 0:  # archive every hour that the writer has moved past
                store.archive(now=from_us(hour_floor(ts[acked - 1])))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while acked == 0:  # before the first append the contract is unknown (NOT_FOUND), not empty
        time.sleep(0.001)
    rng = random.Random(5)
    queries = 0
    while not done.is_set() or queries < 5:
        lo, hi = sorted(rng.sample(range(table.num_rows), 2))
        start, end = from_us(ts[lo]), from_us(ts[hi])
        floor = acked  # everything acknowledged before the query must be in its answer
        served = client.tables(CID, "bid_ask", start, end)["bid_ask"]
        expected = between(table.slice(0, max(floor, 1)), start, end)
        full = between(table, start, end)
        if served.num_rows < expected.num_rows or not served.equals(full.slice(0, served.num_rows)):
            errors.append(f"range {start}..{end}: served {served.num_rows}, acknowledged {expected.num_rows}")
        queries += 1
    writer.join()
    assert not errors, errors[:3]
    assert queries >= 5
    final = client.tables(CID, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11))["bid_ask"]
    assert final.equals(table)
    assert len(store.index.archives(CID, "bid_ask", 0, 2**62)) >= 3, "archival did not run during the test"


def test_the_tail_of_an_hour_archived_during_planning_counts_once(tmp_path):
    """The archiver seals and publishes the open segment's hour between a reader's buffer snapshot
    and its index read: the tail must not answer beside the published file."""
    settings = Settings(data_root=tmp_path / "data", rotation_interval=timedelta(minutes=5),
                        archive_delay=timedelta(0), fsync="none")
    with Store(settings) as store:
        table = ticks(utc(2025, 1, 10, 12, 50), 200, "last", seed=1)
        assert table.column("ts")[-1].as_py() < utc(2025, 1, 10, 13)
        store.append(MNQ.contract_id, "last", table)  # the open segment, in hour 12
        archives, archived = store.index.archives, []

        def archive_first(*args):  # the archiver runs right after the reader's snapshot
            if not archived:
                store.index.archives = archives  # the archiver itself reads the index too
                archived.extend(store.archive(now=utc(2025, 1, 10, 13, 5)))
            return archives(*args)

        store.index.archives = archive_first
        read = store.planner.plan(StreamKey(MNQ.contract_id, TickType.LAST), 0, 2**62, 32_768).read_all()
    assert len(archived) == 1 and read.num_rows == 200
