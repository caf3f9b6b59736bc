"""Every tick written is every tick served, bit for bit, over Flight."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow as pa
import pytest

from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, append_in_batches, between, ticks, utc

CID = MNQ.contract_id


def served_table(client, tick_type: str, start: datetime, end: datetime) -> pa.Table:
    return client.tables(CID, tick_type, start, end)[tick_type]


def assert_same(served: pa.Table, expected: pa.Table) -> None:
    assert served.num_rows == expected.num_rows
    assert served.equals(expected.cast(served.schema)), "served ticks differ from written ticks"


@pytest.fixture
def three_hours(store: Store) -> pa.Table:
    """~3 h of quotes 13:40-16:40 UTC; hours 13 and 14 archived, 15 and 16 in segments."""
    table = ticks(utc(2025, 1, 10, 13, 40), 40_000, rate_scale=0.25)
    append_in_batches(store, table)
    published = store.archive(now=utc(2025, 1, 10, 15, 30))
    assert [e.hour_start_us for e in published] == [
        int(utc(2025, 1, 10, h).timestamp()) * 1_000_000 for h in (13, 14)
    ]
    return table


@pytest.mark.parametrize(
    "start, end",
    [
        (utc(2025, 1, 10), utc(2025, 1, 11)),  # everything
        (utc(2025, 1, 10, 13, 47, 12, 345_678), utc(2025, 1, 10, 15, 2, 0, 500_000)),  # mid-batch to mid-segment
        (utc(2025, 1, 10, 14, 59, 59, 900_000), utc(2025, 1, 10, 15, 0, 0, 100_000)),  # across archive|buffer
        (utc(2025, 1, 10, 14, 4, 59), utc(2025, 1, 10, 14, 10, 1)),  # across rotations inside an archived hour
        (utc(2025, 1, 10, 15, 54, 59, 999_999), utc(2025, 1, 10, 16, 5, 0, 1)),  # across rotations and an hour, buffered
        (utc(2025, 1, 10, 16, 39), utc(2025, 1, 10, 16, 40)),  # the last minute
    ],
)
def test_every_tick_in_range_is_served_exactly(client, three_hours, start, end):
    assert_same(served_table(client, "bid_ask", start, end), between(three_hours, start, end))


def test_range_with_no_ticks_gives_empty_frame_with_schema(client, three_hours):
    frame = client.ticks(CID, "bid_ask", utc(2025, 1, 9), utc(2025, 1, 9, 1))
    assert frame.height == 0
    assert frame.schema == pl.from_arrow(three_hours).schema


def test_range_across_dst_change_in_local_time(store, client):
    new_york = ZoneInfo("America/New_York")
    # US DST began 2025-03-09 02:00 EST = 07:00 UTC; the local clock skips 02:00-03:00.
    table = ticks(utc(2025, 3, 9, 6, 30), 20_000, rate_scale=0.5)
    append_in_batches(store, table)
    store.archive(now=utc(2025, 3, 9, 8))
    start = datetime(2025, 3, 9, 1, 45, tzinfo=new_york)  # 06:45 UTC
    end = datetime(2025, 3, 9, 3, 15, tzinfo=new_york)  # 07:15 UTC: only 30 minutes later
    served = served_table(client, "bid_ask", start, end)
    assert_same(served, between(table, utc(2025, 3, 9, 6, 45), utc(2025, 3, 9, 7, 15)))
    assert served.column("ts")[-1].as_py() - served.column("ts")[0].as_py() < (end - start)


def test_ticks_survive_a_writer_restart(settings):
    first = ticks(utc(2025, 1, 10, 9, 50), 8_000, rate_scale=1.0)
    with Store(settings) as store:
        append_in_batches(store, first)
    second = ticks(utc(2025, 1, 10, 10, 30), 8_000, rate_scale=1.0, seed=1)
    with Store(settings) as store:
        append_in_batches(store, second)
        store.archive(now=utc(2025, 1, 10, 11, 5))
        running = Served(store)
        try:
            served = served_table(running.client, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11))
        finally:
            running.close()
    assert_same(served, pa.concat_tables([first, second]))


def test_trade_sizes_are_exact_decimals(store, client):
    table = ticks(utc(2025, 1, 10, 14), 100, "all_last")
    sizes = [Decimal("0.00012345"), Decimal(7), Decimal("123456789.5")] + [Decimal(1)] * 97
    table = table.set_column(3, "size", pa.array(sizes, table.schema.field("size").type))
    store.append(CID, "all_last", table)
    frame = client.ticks(CID, "all_last", utc(2025, 1, 10), utc(2025, 1, 11))
    assert frame["size"].to_list()[:3] == sizes[:3]
    store.archive(now=utc(2025, 1, 11))
    archived = client.ticks(CID, "all_last", utc(2025, 1, 10), utc(2025, 1, 11))
    assert archived.equals(frame)


def test_several_tick_types_in_one_query(store, client):
    quotes = ticks(utc(2025, 1, 10, 14), 3_000)
    trades = ticks(utc(2025, 1, 10, 14), 500, "last")
    mids = ticks(utc(2025, 1, 10, 14), 700, "mid_point")
    for table in (quotes, trades, mids):
        append_in_batches(store, table)
    frames = client.ticks(CID, ["bid_ask", "last", "mid_point"], utc(2025, 1, 10), utc(2025, 1, 11))
    assert frames["bid_ask"].equals(pl.from_arrow(quotes))
    assert frames["last"].equals(pl.from_arrow(trades))
    assert frames["mid_point"].equals(pl.from_arrow(mids))
