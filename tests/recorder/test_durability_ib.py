"""End to end through ``ibapi`` and the gateway simulator: a disk that refuses writes for a while,
then a lost index and a damaged segment between two runs of the recorder."""

from __future__ import annotations

import errno
from datetime import timedelta

import polars as pl
import pyarrow as pa

from ibstream.simulator.market import SIM_MNQ
from ibstream.storage import Store
from ibstream.storage.failpoints import io_faults
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, list_segments, scan_segment, stream_dir
from tests.helpers import EVERYTHING, wait_until
from tests.recorder.harness import Recording, ib_settings

CID = SIM_MNQ.con_id


def test_refused_writes_then_lost_index_and_damage_between_runs(tmp_path, gateway):
    settings = ib_settings(tmp_path, gateway, rotation_interval=timedelta(seconds=1),
                           contracts=ib_settings(tmp_path, gateway).contracts[:1])
    first = Recording(settings, gateway)
    try:
        first.wait_for_ticks(500)
        io_faults.arm("segment.write", errno.ENOSPC, partial_bytes=300, times=6)  # the disk is full a while
        wait_until(lambda: not io_faults.armed("segment.write"), timeout=30, what="the faults to be used up")
        first.wait_for_ticks(500)
        first.settle()
        first.assert_served_equals_sent(streams=[(CID, "bid_ask"), (CID, "last")])
    finally:
        io_faults.disarm()
        first.close()
    with Store(settings, read_only=True) as store:
        before = store.read(CID, "bid_ask", *EVERYTHING)

    for path in settings.data_root.glob("index.sqlite*"):  # lost between the runs, and a segment damaged
        path.unlink()
    closed = list_segments(stream_dir(settings.buffer_root, StreamKey(CID, TickType.BID_ASK)))
    victim = max(closed, key=lambda p: len(scan_segment(p).batches))
    batches = [pa.RecordBatch.from_pylist(b.to_pylist(), schema=b.schema)  # copies: scans map the file
               for b in scan_segment(victim).batches]
    with open(victim, "r+b") as handle:
        handle.seek(victim.stat().st_size // 2)
        handle.write(b"\x00" * 64)

    gateway.resume()
    second = Recording(settings, gateway)
    try:
        kept = scan_segment(victim).batches  # the repaired segment: every batch the damage spared
        assert 0 < len(kept) < len(batches)
        lost = pl.from_arrow(pa.Table.from_batches([b for b in batches if not any(b.equals(k) for k in kept)]))
        expected = pl.from_arrow(before).join(lost, on=lost.columns, how="anti")
        last = before.column("ts")[-1].as_py()
        served = pl.from_arrow(second.service.store.read(CID, "bid_ask", *EVERYTHING)).filter(pl.col("ts") <= last)
        assert served.equals(expected), "everything but the damaged batches, in order"
        coverage = second.service.store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist()
        (damaged,) = [row for row in coverage if row["status"] == "damaged"]
        assert damaged["start"] <= lost["ts"].min() and lost["ts"].max() <= damaged["end"]
        assert f"in buffer/{CID}/bid_ask/{victim.name}, kept in quarantine/" in damaged["reason"]
        second.wait_for_ticks(200)  # and recording goes on
    finally:
        second.close()
