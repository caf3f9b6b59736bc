"""Archived hours: Hive layout readable by polars and DuckDB, sorted, and exact statistics."""

from __future__ import annotations

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from ibstream.storage.synthetic import MNQ
from tests.helpers import append_in_batches, ticks, utc

CID = MNQ.contract_id


@pytest.fixture
def archived(store):
    quotes = ticks(utc(2025, 1, 10, 13, 30), 30_000, rate_scale=0.5)
    trades = ticks(utc(2025, 1, 10, 13, 30), 6_000, "last", rate_scale=0.5)
    append_in_batches(store, quotes)
    append_in_batches(store, trades)
    store.archive(now=utc(2025, 1, 11))
    return quotes, trades


def test_archive_is_hive_partitioned_for_polars_with_pruning(store, archived):
    quotes, _ = archived
    root = store.settings.archive_root / "tick_type=bid_ask"
    frame = pl.scan_parquet(root, hive_partitioning=True)
    hour_14 = frame.filter((pl.col("contract_id") == CID) & (pl.col("hour") == 14)).drop("contract_id", "date", "hour")
    expected = pl.from_arrow(quotes).filter(pl.col("ts").dt.hour() == 14)
    assert hour_14.collect().equals(expected)


def test_archive_reads_in_duckdb(store, archived):
    _, trades = archived
    path = store.settings.archive_root / "tick_type=last" / "**" / "*.parquet"
    count, volume = duckdb.sql(
        f"SELECT count(*), sum(size) FROM read_parquet('{path}', hive_partitioning=true) WHERE contract_id = {CID}"
    ).fetchall()[0]
    assert count == trades.num_rows
    assert volume == pl.from_arrow(trades)["size"].sum()


def test_archive_files_are_sorted_by_ts_and_indexed(store, archived):
    quotes, _ = archived
    entries = store.index.archives(CID, "bid_ask", 0, 2**62)
    assert sum(e.tick_count for e in entries) == quotes.num_rows
    for entry in entries:
        table = pq.read_table(store.settings.archive_root / entry.file_path)
        ts = table.column("ts").cast("int64").to_pylist()
        assert ts == sorted(ts)
        assert (ts[0], ts[-1], len(ts)) == (entry.start_us, entry.end_us, entry.tick_count)
        assert entry.file_size_bytes == (store.settings.archive_root / entry.file_path).stat().st_size


def test_daily_statistics_match_a_polars_computation(store, archived):
    quotes, trades = archived
    (trade_day,) = store.statistics(CID, "last")
    frame = pl.from_arrow(trades).with_columns(pl.col("size").cast(pl.Float64))
    assert trade_day.date == "2025-01-10"
    assert trade_day.total_ticks == frame.height
    assert trade_day.unique_prices == frame["price"].n_unique()
    assert trade_day.total_volume == pytest.approx(frame["size"].sum(), rel=1e-12)
    assert trade_day.vwap == pytest.approx((frame["price"] * frame["size"]).sum() / frame["size"].sum(), rel=1e-12)
    assert (trade_day.high_price, trade_day.low_price) == (frame["price"].max(), frame["price"].min())
    (quote_day,) = store.statistics(CID, "bid_ask")
    mid = pl.from_arrow(quotes).select(((pl.col("bid_price") + pl.col("ask_price")) / 2).alias("mid"))["mid"]
    assert (quote_day.total_ticks, quote_day.unique_prices) == (quotes.num_rows, mid.n_unique())
    assert (quote_day.high_price, quote_day.low_price, quote_day.vwap) == (mid.max(), mid.min(), None)
