"""Segment rotation, ordering and sealing rules."""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pytest

from ibstream.core.errors import SealedHourError, TickOrderError
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, coalesce_segment, list_segments, scan_segment, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import ticks, utc

CID = MNQ.contract_id
KEY = StreamKey(CID, TickType.BID_ASK)


def segment_names(store: Store) -> list[str]:
    return [p.name for p in list_segments(stream_dir(store.settings.buffer_root, KEY))]


def test_segments_rotate_on_interval_boundaries(store):
    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 13, 58), 3_000))  # ~3.5 min at 15/s
    # the name: the bucket's UTC start, then a sequence number that grows with every segment of the stream
    assert segment_names(store) == ["20250110T135500Z-0000.arrows", "20250110T140000Z-0001.arrows"]


def test_segments_rotate_on_size(settings):
    small = settings.model_copy(update={"segment_max_bytes": 50_000})
    with Store(small) as store:
        table = ticks(utc(2025, 1, 10, 14), 5_000, rate_scale=20)
        for offset in range(0, 5_000, 500):
            store.append(CID, "bid_ask", table.slice(offset, 500))
        names = segment_names(store)
        assert len(names) > 3 and all(n.startswith("20250110T140000Z-") for n in names)
        assert store.read(CID, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11)).equals(table)


def test_ts_going_backwards_is_refused(store):
    table = ticks(utc(2025, 1, 10, 14), 100)
    store.append(CID, "bid_ask", table.slice(50))
    with pytest.raises(TickOrderError, match="ts must be non-decreasing"):
        store.append(CID, "bid_ask", table.slice(0, 50))


def test_ticks_for_an_archived_hour_are_refused(store):
    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 100))
    store.archive(now=utc(2025, 1, 10, 16))
    store.close()
    with Store(store.settings) as reopened:  # the seal survives a restart (read from the index)
        with pytest.raises(SealedHourError, match="already archived"):
            reopened.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14, 30), 10))


@pytest.mark.parametrize("interval", [timedelta(minutes=7), timedelta(milliseconds=500)])
def test_rotation_interval_must_divide_an_hour(interval):
    with pytest.raises(ValueError, match="must be whole seconds and divide one hour exactly"):
        Settings(rotation_interval=interval)


def test_only_segments_of_small_commits_are_coalesced(settings):
    table = ticks(utc(2025, 1, 10, 14), 3_000)
    with Store(settings) as store:
        for offset in range(0, 1_500, 5):
            store.append(CID, "bid_ask", table.slice(offset, 5))
        store.append(CID, "bid_ask", table.slice(1_500))  # one large batch
    (path,) = list_segments(stream_dir(settings.buffer_root, KEY))
    done = coalesce_segment(path, batch_rows=1_000)
    assert done is not None and (done.batches_before, done.batches_after) == (301, 3)
    assert coalesce_segment(path, batch_rows=1_000) is None, "already coalesced"
    assert pa.ipc.open_stream(path.read_bytes()).read_all().equals(table), "plain pyarrow reads it"
    assert scan_segment(path).whole
