"""Archiver: the segments of a closed UTC hour become one Parquet file per stream and hour.

Layout (Hive-style, read directly by ``polars.scan_parquet`` and DuckDB with partition
pruning)::

    {data_root}/archive/tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=14/data.parquet

Publication is atomic and crash-safe. The steps, with what answers queries after a crash at
each point:

1. write ``data.parquet.tmp`` and fsync it                -> segments (tmp removed on start)
2. rename to ``data.parquet``, fsync the folder          -> segments (file not in the index: removed on start)
3. commit the ``tick_archives`` row, the hour's 1-minute  -> the Parquet file (segments of the hour are skipped
   pre-aggregates (``hour_bars``) + day statistics           by readers and deleted on start)
4. delete the hour's segments
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ibstream.settings import Settings
from storage.bars import PREAGGREGATE_US, partial_table
from storage.failpoints import failpoint
from storage.index import ArchiveEntry, DailyStatistics, Index
from storage.schemas import TickType
from storage.segments import SegmentWriter, StreamKey, fsync_dir, ipc_bytes, read_segment, segment_start_us
from storage.times import US_PER_HOUR, duration_us, from_us, hour_floor, iso, now_us

log = logging.getLogger(__name__)

FILE_NAME = "data.parquet"
TMP_SUFFIX = ".tmp"


def archive_relpath(key: StreamKey, hour_start_us: int) -> str:
    hour = from_us(hour_start_us)
    return (
        f"tick_type={key.tick_type.value}/contract_id={key.contract_id}/"
        f"date={hour:%Y-%m-%d}/hour={hour:%H}/{FILE_NAME}"
    )


def parquet_options(settings: Settings, schema: pa.Schema) -> dict:
    """Writer options for tick data; the choice is measured in bench/bench_storage.py.

    Sorted microsecond clocks take DELTA_BINARY_PACKED (a few bits per tick); prices, sizes and
    flags on a price grid take dictionary + RLE; zstd compresses what is left.
    """
    clocks = ["ts", "ib_time"]
    codec = settings.parquet_compression
    return dict(
        compression=None if codec == "none" else codec,
        compression_level=settings.parquet_compression_level if codec in ("zstd", "gzip") else None,
        use_dictionary=[name for name in schema.names if name not in clocks],
        column_encoding={name: "DELTA_BINARY_PACKED" for name in clocks},
        store_decimal_as_integer=True,
        write_statistics=True,
        row_group_size=1 << 20,
        sorting_columns=[pq.SortingColumn(schema.get_field_index("ts"))],
    )


def read_segments(paths: list[Path], schema: pa.Schema) -> pa.Table:
    batches = [batch for path in paths for batch in read_segment(path)[0]]
    return pa.Table.from_batches(batches, schema=schema)


def day_statistics(key: StreamKey, date: str, tables: list[pl.LazyFrame]) -> DailyStatistics:
    """Daily statistics of a stream over the given frames (all ticks of one UTC day).

    Trades: price and size. Quotes: the mid price, ignoring one-sided quotes (a price <= 0);
    mid_point: its price. Volume and VWAP are defined for trades only.
    """
    frame = pl.concat(tables, how="vertical_relaxed")
    if key.tick_type is TickType.BID_ASK:
        price = pl.when((pl.col("bid_price") > 0) & (pl.col("ask_price") > 0)).then(
            (pl.col("bid_price") + pl.col("ask_price")) / 2
        )
    elif key.tick_type is TickType.MID_POINT:
        price = pl.col("mid_point")
    else:
        price = pl.col("price")
    trades = key.tick_type in (TickType.LAST, TickType.ALL_LAST)
    exprs = [
        pl.len().alias("total_ticks"),
        price.filter(price > 0).n_unique().alias("unique_prices"),
        price.filter(price > 0).max().alias("high_price"),
        price.filter(price > 0).min().alias("low_price"),
    ]
    if trades:
        size = pl.col("size").cast(pl.Float64)
        exprs += [size.sum().alias("total_volume"), ((price * size).sum() / size.sum()).alias("vwap")]
    row = frame.select(exprs).collect().row(0, named=True)
    return DailyStatistics(
        contract_id=key.contract_id,
        tick_type=key.tick_type.value,
        date=date,
        total_ticks=row["total_ticks"],
        unique_prices=row["unique_prices"],
        total_volume=row.get("total_volume"),
        vwap=row.get("vwap"),
        high_price=row["high_price"],
        low_price=row["low_price"],
    )


@dataclass
class Archiver:
    """Turns closed hours of buffered segments into published Parquet files."""

    settings: Settings
    index: Index
    writer: SegmentWriter

    @property
    def root(self) -> Path:
        return self.settings.archive_root

    def run_once(self, now: int | None = None) -> list[ArchiveEntry]:
        """Archive every hour that ended at least ``archive_delay`` before ``now`` (microseconds)."""
        now = now_us() if now is None else now
        horizon = now - duration_us(self.settings.archive_delay)
        published = []
        for key in self.writer.streams():
            for hour in self._closed_hours(key, horizon):
                try:
                    entry = self.archive_hour(key, hour)
                except Exception:
                    log.exception("archiving %s hour %s failed; its segments keep answering queries", key, iso(hour))
                    break  # keep hours in order: retry this one on the next run
                if entry is not None:
                    published.append(entry)
        return published

    def _closed_hours(self, key: StreamKey, horizon: int) -> list[int]:
        snapshot = self.writer.snapshot(key)
        paths = snapshot.closed + ([snapshot.open_path] if snapshot.open_path else [])
        hours = sorted({hour_floor(segment_start_us(p)) for p in paths})
        return [h for h in hours if h + US_PER_HOUR <= horizon]

    def archive_hour(self, key: StreamKey, hour: int) -> ArchiveEntry | None:
        """Archive one hour of a stream; None when its segments held no tick (they are removed)."""
        hour_end = hour + US_PER_HOUR
        self.writer.seal(key, hour_end)
        segments = [p for p in self.writer.snapshot(key).closed if hour_floor(segment_start_us(p)) == hour]
        table = read_segments(segments, self.writer.schema(key))
        if table.num_rows == 0:
            self.writer.forget_segments(key, segments)
            return None
        table = _sorted_by_ts(table)
        relpath = archive_relpath(key, hour)
        path = self.root / relpath
        file_size = self._write_atomically(table, path)
        ts = table.column("ts").cast(pa.int64())
        entry = ArchiveEntry(
            contract_id=key.contract_id,
            tick_type=key.tick_type.value,
            hour_start=hour,
            start_time=ts[0].as_py(),
            end_time=ts[-1].as_py(),
            file_path=relpath,
            tick_count=table.num_rows,
            file_size_bytes=file_size,
            arrow_size_bytes=table.nbytes,
        )
        statistics = self._statistics_with(key, hour, path)
        minute_bars = ipc_bytes(partial_table(table, key.tick_type, PREAGGREGATE_US))
        self.index.publish(entry, statistics, minute_bars)
        failpoint("archive.after_publish")
        self.writer.forget_segments(key, segments)
        log.info(
            "archived %s hour %s: %d ticks, %d segments -> %s (%.1f bytes/tick)",
            key, iso(hour), entry.tick_count, len(segments), relpath, file_size / entry.tick_count,
        )
        return entry

    def _write_atomically(self, table: pa.Table, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        pq.write_table(table, tmp, **parquet_options(self.settings, table.schema))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        failpoint("archive.after_write_tmp")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        failpoint("archive.after_rename")
        return path.stat().st_size

    def _statistics_with(self, key: StreamKey, hour: int, new_file: Path) -> DailyStatistics:
        day_start = hour - hour % (24 * US_PER_HOUR)
        earlier = self.index.archives(key.contract_id, key.tick_type.value, day_start, hour)
        files = [self.root / e.file_path for e in earlier] + [new_file]
        frames = [pl.scan_parquet(f) for f in files]
        return day_statistics(key, f"{datetime.fromtimestamp(hour / 1e6, UTC):%Y-%m-%d}", frames)


def _sorted_by_ts(table: pa.Table) -> pa.Table:
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    if len(ts) > 1 and (ts[1:] < ts[:-1]).any():
        log.warning("segments were out of ts order; sorting before archival")
        return table.sort_by("ts")
    return table.combine_chunks()


def recover_archive(root: Path, index: Index) -> None:
    """Remove what a crash mid-archival left behind: tmp files and files the index never published."""
    if not root.is_dir():
        return
    published = index.all_archive_paths()
    for path in root.rglob("*"):
        if path.name.endswith(TMP_SUFFIX):
            path.unlink()
            log.warning("removed unfinished archive file %s", path)
        elif path.name == FILE_NAME and path.relative_to(root).as_posix() not in published:
            path.unlink()
            log.warning("removed unpublished archive file %s; its segments still hold the hour", path)
