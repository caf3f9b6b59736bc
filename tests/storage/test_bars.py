"""Bars over Flight equal a plain polars ``group_by_dynamic`` over the same raw ticks.

The store holds five hours of three streams: the first three hours archived (so bars from 1m
up come from the per-hour 1-minute pre-aggregates), the rest in segments and the open tail.
Ranges are drawn at random, cut mid-bar, and span archive and buffer.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from ibstream.core.errors import InvalidRequestError
from ibstream.core.times import US_PER_HOUR, to_us
from ibstream.settings import Settings
from ibstream.storage import Plan, Store
from ibstream.storage.bars import BAR_RESOLUTIONS, PREAGGREGATE_US, partial_bars
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import from_ipc_bytes
from ibstream.storage.synthetic import MNQ
from tests.bar_reference import assert_bars_equal, reference_bars
from tests.helpers import Served, append_in_batches, ticks, utc

T0 = utc(2025, 1, 10, 12)
ARCHIVED_UNTIL = utc(2025, 1, 10, 15)
SUB_DAY = [r for r in BAR_RESOLUTIONS if r != "1d"]
TICK_TYPES = ["bid_ask", "last", "mid_point"]
def one_sided(table: pa.Table, every: int) -> pa.Table:
    """Quotes with every ``every``-th bid withdrawn (bid 0), as IB sends one-sided books."""
    bids = table.column("bid_price").to_numpy().copy()
    bids[::every] = 0.0
    return table.set_column(table.schema.get_field_index("bid_price"), "bid_price", pa.array(bids))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with 5 hours of bid_ask, last and mid_point (3 archived), served over Flight."""
    root = tmp_path_factory.mktemp("bars")
    settings = Settings(data_root=root / "data", rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0),
                        flight_port=0, fsync="none")
    raw = {}
    with Store(settings) as store:
        for tick_type, count, every in (("bid_ask", 60_000, 7), ("last", 9_000, 0), ("mid_point", 30_000, 0)):
            table = ticks(T0, count, tick_type, seed=3, rate_scale=count / 5 / 3600 / 17)
            table = one_sided(table, every) if every else table
            append_in_batches(store, table)
            raw[tick_type] = table
        store.archive(now=ARCHIVED_UNTIL)
        served = Served(store)
        yield store, served, {k: pl.from_arrow(v) for k, v in raw.items()}
        served.close()


def test_the_world_spans_archive_and_buffer(world):
    store, _, raw = world
    for tick_type, frame in raw.items():
        last = frame.get_column("ts").max()
        assert last > ARCHIVED_UNTIL + timedelta(hours=1), tick_type  # ticks remain in the buffer
        assert store.index.archived_until()[(MNQ.contract_id, tick_type)] == to_us(ARCHIVED_UNTIL)


@given(tick_type=st.sampled_from(TICK_TYPES), resolution=st.sampled_from(SUB_DAY),
       start_s=st.integers(0, 5 * 3600), length_s=st.integers(1, 5 * 3600), micros=st.integers(0, 999_999))
@example(tick_type="bid_ask", resolution="1m", start_s=0, length_s=5 * 3600, micros=0)       # everything
@example(tick_type="last", resolution="1h", start_s=3600, length_s=2 * 3600, micros=0)       # whole archived hours
@example(tick_type="last", resolution="5m", start_s=2 * 3600 + 1799, length_s=3 * 3600, micros=1)  # cut, across
@example(tick_type="mid_point", resolution="30s", start_s=3 * 3600 - 7, length_s=14, micros=500_000)  # at the seam
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bars_equal_a_plain_polars_group_by(world, tick_type, resolution, start_s, length_s, micros):
    _, served, raw = world
    start = T0 + timedelta(seconds=start_s, microseconds=micros)
    end = start + timedelta(seconds=length_s)
    bars = served.client.bars(MNQ.contract_id, tick_type, resolution, start, end)
    expected = reference_bars(raw[tick_type].filter((pl.col("ts") >= start) & (pl.col("ts") < end)), tick_type,
                              resolution)
    assert_bars_equal(bars, expected)


@given(seed=st.integers(0, 10_000), count=st.integers(1, 2_500), tick_type=st.sampled_from(TICK_TYPES),
       resolution=st.sampled_from(SUB_DAY), archive_hours=st.integers(0, 3))
@hypothesis_settings(max_examples=15, deadline=None)
def test_bars_of_random_tick_sets(seed, count, tick_type, resolution, archive_hours):
    """Random tick sets (sizes, one-sided books, bursts), some hours archived, the rest buffered."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_root=Path(tmp) / "data", rotation_interval=timedelta(minutes=5),
                            archive_delay=timedelta(0), flight_port=0, fsync="none")
        table = ticks(T0, count, tick_type, seed=seed, rate_scale=count / 4 / 3600 / 17)
        if tick_type == "bid_ask":
            table = one_sided(table, 1 + seed % 5)
        with Store(settings) as store:
            append_in_batches(store, table, batch=101)
            store.archive(now=T0 + timedelta(hours=archive_hours))
            served = Served(store)
            try:
                start, end = T0, T0 + timedelta(hours=5)
                bars = served.client.bars(MNQ.contract_id, tick_type, resolution, start, end)
            finally:
                served.close()
        raw = pl.from_arrow(table).filter((pl.col("ts") >= start) & (pl.col("ts") < end))
        assert_bars_equal(bars, reference_bars(raw, tick_type, resolution))


def test_preaggregates_equal_the_hours_raw_ticks(world):
    store, _, raw = world
    hour = to_us(T0) + US_PER_HOUR
    for tick_type in TICK_TYPES:
        blobs = store.index.hour_bars(MNQ.contract_id, tick_type, hour, hour + 1)
        ticks_of_hour = store.read(MNQ.contract_id, tick_type, T0 + timedelta(hours=1), T0 + timedelta(hours=2))
        expected = partial_bars(ticks_of_hour, TickType(tick_type), PREAGGREGATE_US)
        assert_frame_equal(pl.from_arrow(from_ipc_bytes(blobs[hour])), expected)


def test_hours_archived_before_preaggregates_are_backfilled(tmp_path, settings):
    table = ticks(T0, 20_000, "last", seed=9, rate_scale=20_000 / 3 / 3600 / 17)
    with Store(settings) as store:
        append_in_batches(store, table)
        store.archive(now=T0 + timedelta(hours=2))
        with_preaggregates = store.bars(MNQ.contract_id, "last", to_us(T0), to_us(T0) + 3 * US_PER_HOUR, "5m")
        store.index._connection().execute("DELETE FROM hour_bars")  # as an older version left the index
        store.cache.clear()
        backfilled = store.bars(MNQ.contract_id, "last", to_us(T0), to_us(T0) + 3 * US_PER_HOUR, "5m")
        assert backfilled.equals(with_preaggregates)
        assert len(store.index.hour_bars(MNQ.contract_id, "last", 0, 2**62)) == 2  # kept for next time


def test_fill_gives_every_bar_of_the_range(world):
    _, served, raw = world
    start, end = T0 + timedelta(minutes=59, seconds=30), T0 + timedelta(hours=1, minutes=10)
    quiet = raw["last"].filter((pl.col("ts") >= start) & (pl.col("ts") < end))
    bars = served.client.bars(MNQ.contract_id, "last", "5s", start, end, fill=True)
    assert bars.height == (10 * 60 + 30) // 5
    assert bars.get_column("ts").to_list()[0] == start
    assert bars.get_column("trade_count").sum() == quiet.height
    empty = bars.filter(pl.col("trade_count") == 0)
    assert empty.height > 0 and empty.get_column("close").null_count() == empty.height
    assert empty.get_column("volume").cast(pl.Float64).sum() == 0


def test_several_contracts_and_tick_types(world):
    _, served, raw = world
    start, end = T0 + timedelta(minutes=170), T0 + timedelta(minutes=190)
    frames = served.client.bars([MNQ.contract_id], ["bid_ask", "last"], "1m", start, end)
    assert set(frames) == {"bid_ask", "last"}
    assert frames["last"].columns[0] == "contract_id"
    assert frames["last"].get_column("contract_id").unique().to_list() == [MNQ.contract_id]
    expected = reference_bars(raw["last"].filter((pl.col("ts") >= start) & (pl.col("ts") < end)), "last", "1m")
    assert_bars_equal(frames["last"].drop("contract_id"), expected)


def test_closed_ranges_are_cached_and_open_ones_never_stale(world, settings):
    store, served, _ = world
    closed = (to_us(T0), to_us(ARCHIVED_UNTIL))
    store.cache.clear()
    first = store.bars(MNQ.contract_id, "last", *closed, "1m")
    hits = store.cache.hits
    assert store.bars(MNQ.contract_id, "last", *closed, "1m") is first and store.cache.hits == hits + 1
    assert store.ticks(MNQ.contract_id, "last", *closed).num_rows == first.column("trade_count").to_numpy().sum()

    with Store(settings) as fresh:  # a stream still being written: never cached, never stale
        table = ticks(T0, 2_000, "last", seed=1)
        append_in_batches(fresh, table.slice(0, 1_000))
        span = (to_us(T0), to_us(T0) + 10 * US_PER_HOUR)
        assert fresh.bars(MNQ.contract_id, "last", *span, "1h").column("trade_count").to_pylist() == [1_000]
        append_in_batches(fresh, table.slice(1_000))
        assert fresh.bars(MNQ.contract_id, "last", *span, "1h").column("trade_count").to_pylist() == [2_000]
        assert fresh.cache.hits == 0 and fresh.cache.current_bytes == 0


@pytest.mark.parametrize("resolution", ["2m", "1M", "tick!", ""])
def test_unknown_resolution_is_refused(world, resolution):
    _, served, _ = world
    with pytest.raises(InvalidRequestError, match=f"resolution was {resolution!r}; use any of tick, 1s, 5s"):
        served.client.bars(MNQ.contract_id, "last", resolution, T0, T0 + timedelta(hours=1))


def test_closed_ranges_too_big_to_cache_are_streamed(tmp_path):
    settings = Settings(data_root=tmp_path / "data", archive_delay=timedelta(0), flight_port=0, fsync="none",
                        cache_max_bytes=2_000_000)  # one result may take 500 kB: an hour, not three
    with Store(settings) as store:
        append_in_batches(store, ticks(T0, 20_000, "last", seed=2, rate_scale=20_000 / 2 / 3600 / 1.5))
        store.archive(now=T0 + timedelta(hours=3))
        small, large = (to_us(T0), to_us(T0) + US_PER_HOUR), (to_us(T0), to_us(T0) + 3 * US_PER_HOUR)
        assert isinstance(store.ticks(MNQ.contract_id, "last", *small), pa.Table)  # cached, materialised
        assert isinstance(store.ticks(MNQ.contract_id, "last", *large), Plan)  # over a quarter of the cache
        assert store.ticks(MNQ.contract_id, "last", *large).read_all().num_rows > 5_000


def test_a_growing_segment_is_cached_once(tmp_path):
    """A server on a store another process records into re-reads the open segment as it grows;
    the segment cache keeps only its newest size (else every poll of a live stream adds a copy)."""
    settings = Settings(data_root=tmp_path / "data", flight_port=0, fsync="none")
    table = ticks(T0, 3_000, "last", seed=15)
    with Store(settings) as writer, Store(settings, read_only=True) as reader:
        for offset in range(0, table.num_rows, 100):
            writer.append(MNQ.contract_id, "last", table.slice(offset, 100))
            assert reader.read(MNQ.contract_id, "last", T0, T0 + timedelta(days=1)).num_rows == offset + 100
        cached_paths = [path for path, _size in reader.planner.cache._entries]
        assert len(cached_paths) == len(set(cached_paths)) == len(list(settings.buffer_root.rglob("*.arrows")))


def test_partial_bars_before_the_first_session_belong_to_no_day():
    import datetime as dt

    from ibstream.storage.bars import rollup_sessions
    from ibstream.storage.sessions import Session

    partials = pl.DataFrame({"ts": [0, 120_000_000], "open": [1.0, 2.0], "high": [1.0, 2.0], "low": [1.0, 2.0],
                             "close": [1.0, 2.0], "tick_count": [1, 1]}).with_columns(
        pl.col("ts").cast(pl.Datetime("us", "UTC")))
    day = [Session(1, "full_day", dt.date(1970, 1, 1), 60_000_000, 600_000_000, "clock")]
    assert rollup_sessions(partials, TickType.MID_POINT, day).get_column("tick_count").to_list() == [1]

