"""Archiver: the segments of a closed UTC hour become one Parquet file per stream and hour.

Layout (Hive-style, read directly by ``polars.scan_parquet`` and DuckDB with partition
pruning)::

    {data_root}/archive/tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=14/data.parquet

Each file describes itself in its Parquet key-value metadata (``ibstream.archive``: stream,
hour, first and last ``ts``, tick count, the contract's details and the hour's coverage), so
the index can be rebuilt from the files alone, and carries page CRCs (``write_page_checksum``)
that every read verifies.

Publication is atomic and crash-safe. The steps, with what answers queries after a crash at
each point:

1. write ``data.parquet.tmp`` and fsync it                -> segments (tmp removed on start)
2. rename to ``data.parquet``, fsync the folder          -> segments (on start the file, unknown to the
                                                            index, is adopted if it holds exactly the
                                                            hour's segments, else quarantined)
3. commit the ``tick_archives`` row, the hour's 1-minute  -> the Parquet file (segments of the hour are skipped
   pre-aggregates (``hour_bars``) + day statistics           by readers; on start each is deleted once the
                                                            file is shown to hold its every tick)
4. delete the hour's segments

Recovery never deletes by inference: a file the index does not know is re-indexed from its own
contents, and what cannot be proven redundant is moved to the quarantine, never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from cachetools import LRUCache

from ibstream.core.errors import DamagedDataError
from ibstream.core.ticks import TickFamily
from ibstream.core.times import US_PER_HOUR, as_micros, duration_us, from_us, hour_floor, iso, now_us
from ibstream.storage.bars import PREAGGREGATE_US, partial_table, tick_price
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint, io_faults
from ibstream.storage.index import (
    ArchiveEntry,
    ContractDetails,
    CoverageInterval,
    DailyStatistics,
    Index,
    SupersededFile,
)
from ibstream.storage.quarantine import Damage, quarantine_file
from ibstream.storage.schemas import TickType, schema_for
from ibstream.storage.segments import (
    SegmentWriter,
    StreamKey,
    fsync_dir,
    ipc_bytes,
    scan_segment,
    segment_start_us,
)

log = logging.getLogger(__name__)

FILE_NAME = "data.parquet"
DAY_FOLDER, DAY_PREFIX = "hour=all", "day-"  # compacted day files: date=.../hour=all/day-{made_us}.parquet
TMP_SUFFIX = ".tmp"
SUPERSEDED = "superseded"  # {data_root}/superseded/: files compaction replaced, kept for a grace period
METADATA_KEY = b"ibstream.archive"
_HOURLY = re.compile(r"data(-\d+)?\.parquet")  # data.parquet; data-{made_us}.parquet: an hour a backfill rewrote
_HIVE = re.compile(r"tick_type=(\w+)/contract_id=(\d+)/date=(\d{4})-(\d\d)-(\d\d)/hour=(\d\d)/data(-\d+)?\.parquet$")
BACKFILL_SOURCE = "backfill"  # ``source.kind`` of an hour file written by storage.backfill


def archive_relpath(key: StreamKey, hour_start_us: int, made_us: int | None = None) -> str:
    """An hourly file's path: ``.../hour=HH/data.parquet``, or ``data-{made_us}.parquet`` for one that
    replaces (or may sit beside an unfinished) other file of the hour (storage.backfill)."""
    hour = from_us(hour_start_us)
    name = FILE_NAME if made_us is None else f"data-{made_us}.parquet"
    return (
        f"tick_type={key.tick_type.value}/contract_id={key.contract_id}/"
        f"date={hour:%Y-%m-%d}/hour={hour:%H}/{name}"
    )


def day_relpath(key: StreamKey, day_start_us: int, made_us: int) -> str:
    """Where a compacted day file goes: beside the day's hour folders, as partition ``hour=all``."""
    return (f"tick_type={key.tick_type.value}/contract_id={key.contract_id}/date={from_us(day_start_us):%Y-%m-%d}/"
            f"{DAY_FOLDER}/{DAY_PREFIX}{made_us}.parquet")


def is_archive_file(path: Path) -> bool:
    """An hourly ``data.parquet`` (``data-*.parquet``) or a compacted ``day-*.parquet`` (not a ``.tmp``)."""
    return (_HOURLY.fullmatch(path.name) is not None and path.parent.name != DAY_FOLDER) or (path.parent.name == DAY_FOLDER and path.name.startswith(DAY_PREFIX)
                                      and path.suffix == ".parquet")


def archive_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if is_archive_file(p)) if root.is_dir() else []


def superseded_path(archive_root: Path, relative: str) -> Path:
    """Where a file compaction replaced waits out its grace period (readers that planned it look here)."""
    return archive_root.parent / SUPERSEDED / relative


def locate(archive_root: Path, relative: str) -> Path:
    """An archive file by its index path: in the archive, or (replaced by compaction a moment ago) in superseded/."""
    path = archive_root / relative
    if path.exists():
        return path
    moved = superseded_path(archive_root, relative)
    return moved if moved.exists() else path


def move_to_superseded(archive_root: Path, relative: str) -> None:
    """Take a replaced file out of the archive tree (outside engines stop seeing it; our readers still find it)."""
    source, target = archive_root / relative, superseded_path(archive_root, relative)
    if not source.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)
    remove_empty_dirs(source.parent, archive_root)


def remove_empty_dirs(folder: Path, root: Path) -> None:
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        os.rmdir(folder)
        folder = folder.parent


PRICE_GRID = 256  # prices that are all multiples of 1/256 (futures' 0.25, 1/8, 1/32...) are stored BYTE_STREAM_SPLIT


def parquet_options(settings: StorageSettings, schema: pa.Schema, sample: pa.Table | None = None) -> dict:
    """Writer options for tick data; the choice is measured in bench/bench_storage.py, on the bench
    day and on the IB-Stream fixture.

    Sorted microsecond clocks take DELTA_BINARY_PACKED (a few bits per tick); sizes and flags take
    dictionary + RLE; zstd compresses what is left. Prices take dictionary + RLE too, unless every
    price of ``sample`` (the data to be written, or its first hour) is a multiple of 1/PRICE_GRID:
    such a double's low mantissa bytes are zero, and BYTE_STREAM_SPLIT lets zstd drop them (31%
    smaller prices on the bench day's 0.25 grid; a 0.01 grid's doubles have no zero bytes, and
    BYTE_STREAM_SPLIT made the IB-shaped fixture's 9% larger). Either encoding is lossless for
    any double. Only the clocks get min/max statistics: ``ts`` prunes row groups; the others' cost
    3% on the fixture's small hours.
    """
    clocks = ["ts", "ib_time"]
    prices = [f.name for f in schema if pa.types.is_floating(f.type)]
    split = prices if sample is not None and all(on_binary_grid(sample.column(name)) for name in prices) else []
    codec = settings.parquet_compression
    return dict(
        compression=None if codec == "none" else codec,
        compression_level=settings.parquet_compression_level if codec in ("zstd", "gzip") else None,
        use_dictionary=[name for name in schema.names if name not in clocks and name not in split],
        column_encoding={name: "DELTA_BINARY_PACKED" for name in clocks} | {name: "BYTE_STREAM_SPLIT" for name in split},
        store_decimal_as_integer=True,
        write_statistics=clocks,
        row_group_size=1 << 20,
        sorting_columns=[pq.SortingColumn(schema.get_field_index("ts"))],
        write_page_checksum=True,
    )


def on_binary_grid(column: pa.ChunkedArray) -> bool:
    """Whether ``column`` has values and every one is a finite multiple of 1/PRICE_GRID."""
    with np.errstate(over="ignore", invalid="ignore"):  # the largest doubles overflow: not on the grid
        scaled = column.to_numpy() * PRICE_GRID  # exact: a power of two
        return len(scaled) > 0 and bool(np.isfinite(scaled).all() and (scaled == np.floor(scaled)).all())


# parsed footers by (path, inode, size, mtime), as archive files never change; bounded at ~32 MB (a footer
# takes a few times its serialized size in memory: ~5 KB for an hourly file, ~10-40 KB for a day file)
_FOOTERS: LRUCache = LRUCache(maxsize=32 << 20, getsizeof=lambda metadata: 4 * metadata.serialized_size)
_FOOTERS_LOCK = threading.Lock()


def open_archive_file(path: Path) -> pq.ParquetFile:
    """An archive file whose pages are checked against their CRCs as they are read. Its parsed footer
    is kept (a day file's describes 24 hours of row groups: parsing it took longer than reading an hour)."""
    facts = os.stat(path)
    key = (str(path), facts.st_ino, facts.st_size, facts.st_mtime_ns)
    with _FOOTERS_LOCK:
        metadata = _FOOTERS.get(key)
    parquet = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True, metadata=metadata)
    if metadata is None:
        with _FOOTERS_LOCK:
            _FOOTERS[key] = parquet.metadata
    return parquet


def read_archive_file(path: Path, name: str | None = None, row_groups: list[int] | None = None) -> pa.Table:
    """Every tick of an archive file (or of these row groups of it), checked; :class:`DamagedDataError`
    names the file (as ``name``) if it fails."""
    name = name or str(path)
    try:
        parquet = open_archive_file(path)
        table = parquet.read(use_threads=True) if row_groups is None else \
            parquet.read_row_groups(row_groups, use_threads=True)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise DamagedDataError(f"archive file {name} cannot be read: {exc}") from None
    tick_type = TickType(table.schema.metadata[b"ibstream.tick_type"].decode()) if table.schema.metadata and \
        b"ibstream.tick_type" in table.schema.metadata else None
    if tick_type is None or not table.schema.equals(schema_for(tick_type)):
        raise DamagedDataError(f"archive file {name} does not have a tick schema: {table.schema.names}")
    return table.replace_schema_metadata(schema_for(tick_type).metadata)


def read_entry(archive_root: Path, entry: ArchiveEntry) -> pa.Table:
    """The ticks of one archived hour (its row groups in a day file), checked."""
    return read_archive_file(locate(archive_root, entry.file_path), entry.file_path, entry.row_groups)


def read_segments(paths: list[Path], schema: pa.Schema) -> pa.Table:
    batches = [batch for path in paths for batch in scan_segment(path).batches]
    return pa.Table.from_batches(batches, schema=schema)


@dataclass(frozen=True)
class FileFacts:
    """What an archive file says of itself (its ``ibstream.archive`` metadata, or for files written
    before it existed, its Hive path and footer)."""

    key: StreamKey
    hour_start_us: int
    tick_count: int
    start_us: int | None = None
    end_us: int | None = None
    contract: dict | None = None
    coverage: list = field(default_factory=list)  # [status, reason, start, end(, backfill)] clipped to the hour
    row_group_start: int = 0
    row_group_count: int | None = None  # a day file: the hour's row groups; None: an hourly file
    source: dict | None = None  # where an imported hour's ticks came from (storage.ib_stream_import); None: recorded

    @property
    def row_groups(self) -> list[int] | None:
        return None if self.row_group_count is None else list(
            range(self.row_group_start, self.row_group_start + self.row_group_count))


METADATA_FORMAT = 2  # 1: times named hour_start, start_time, end_time and the contract's updated_at
_FORMAT_1_NAMES = {"hour_start": "hour_start_us", "start_time": "start_us", "end_time": "end_us"}


def _current_names(facts: dict) -> dict:
    """A file's ``ibstream.archive`` metadata with today's key names (files of format 1 are read as written)."""
    if facts.get("format", 1) >= 2:
        return facts
    facts = {_FORMAT_1_NAMES.get(name, name): value for name, value in facts.items()}
    if isinstance(facts.get("contract"), dict) and "updated_at" in facts["contract"]:
        facts["contract"] = dict(facts["contract"])
        facts["contract"]["updated_at_us"] = facts["contract"].pop("updated_at")
    return facts


def file_facts(root: Path, path: Path) -> list[FileFacts]:
    """What an archive file says of each hour it holds (an hourly file: one; a day file: each of its hours)."""
    relative = path.relative_to(root).as_posix()
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise DamagedDataError(f"archive file {relative} has no readable footer: {exc}") from None
    kv = metadata.metadata or {}
    if METADATA_KEY in kv:
        try:
            facts = _current_names(json.loads(kv[METADATA_KEY]))
            key = StreamKey(int(facts["contract_id"]), TickType(facts["tick_type"]))
            hours = facts["hours"] if facts.get("kind") == "day" else [facts]
            return [FileFacts(key, int(h["hour_start_us"]), int(h["tick_count"]), int(h["start_us"]), int(h["end_us"]),
                              facts.get("contract"), h.get("coverage", []), int(h.get("row_group_start", 0)),
                              None if h.get("row_group_count") is None else int(h["row_group_count"]),
                              h.get("source"))
                    for h in hours]
        except (ValueError, KeyError, TypeError) as exc:
            raise DamagedDataError(f"archive file {relative} has unreadable ibstream metadata: {exc}") from None
    place = hive_place(relative)
    if place is None:
        raise DamagedDataError(f"archive file {relative} is not where an hour of a stream belongs")
    return [FileFacts(*place, metadata.num_rows)]


def hive_place(relative: str) -> tuple[StreamKey, int] | None:
    """The stream and hour (µs) an archive path names, e.g. ``tick_type=last/contract_id=1/date=…/hour=14/…``."""
    match = _HIVE.search(relative)
    if match is None:
        return None
    tick_type, cid, year, month, day, hour, _ = match.groups()
    hour_us = int(datetime(int(year), int(month), int(day), int(hour), tzinfo=UTC).timestamp()) * 1_000_000
    return StreamKey(int(cid), TickType(tick_type)), hour_us


def check_archive_file(root: Path, path: Path, expected: ArchiveEntry | None = None, facts: FileFacts | None = None
                       ) -> tuple[ArchiveEntry, FileFacts, pa.Table]:
    """Decode and check one hour of an archive file (``expected``'s, or ``facts``'s; an hourly file's
    by default) against what the file says of itself and what the index says: page CRCs, schema,
    tick count, ``ts`` order, ``ts`` inside its hour, first and last ``ts``, size.
    Raises :class:`DamagedDataError` saying what failed."""
    relative = path.relative_to(root).as_posix()
    if facts is None:
        every = file_facts(root, path)
        wanted = expected.hour_start_us if expected is not None else every[0].hour_start_us
        facts = next((f for f in every if f.hour_start_us == wanted), None)
        if facts is None:
            raise DamagedDataError(f"archive file {relative} does not hold hour {iso(wanted)}, which the index says "
                                   "it does")
    table = read_archive_file(path, relative if facts.row_groups is None else
                              f"{relative} (hour {iso(facts.hour_start_us)})", facts.row_groups)
    problems = []
    if table.schema.metadata[b"ibstream.tick_type"].decode() != facts.key.tick_type.value:
        problems.append(f"holds {table.schema.metadata[b'ibstream.tick_type'].decode()} ticks, not {facts.key.tick_type}")
    ts = as_micros(table.column("ts"))
    if table.num_rows != facts.tick_count:
        problems.append(f"{table.num_rows} ticks where its metadata says {facts.tick_count}")
    if len(ts) and bool(np.any(ts[1:] < ts[:-1])):
        problems.append("ts out of order")
    if len(ts) and (ts[0] < facts.hour_start_us or ts[-1] >= facts.hour_start_us + US_PER_HOUR):
        problems.append(f"ticks outside its hour {iso(facts.hour_start_us)}")
    if len(ts) and facts.start_us is not None and (int(ts[0]), int(ts[-1])) != (facts.start_us, facts.end_us):
        problems.append("first or last ts differs from its metadata")
    if not len(ts):
        problems.append("no tick")
    if expected is not None and problems == []:
        if (expected.tick_count, expected.start_us, expected.end_us) != (table.num_rows, int(ts[0]), int(ts[-1])):
            problems.append(f"{table.num_rows} ticks {iso(int(ts[0]))}..{iso(int(ts[-1]))} where the index says "
                            f"{expected.tick_count} ticks {iso(expected.start_us)}..{iso(expected.end_us)}")
        if expected.row_group_count is None and expected.file_size_bytes != path.stat().st_size:
            problems.append(f"{path.stat().st_size} bytes where the index says {expected.file_size_bytes}")
    if problems:
        raise DamagedDataError(f"archive file {relative}" + ("" if facts.row_groups is None else
                                                              f" hour {iso(facts.hour_start_us)}") +
                               ": " + "; ".join(problems))
    size = path.stat().st_size if facts.row_groups is None else row_groups_bytes(path, facts.row_groups)
    entry = ArchiveEntry(facts.key.contract_id, facts.key.tick_type.value, facts.hour_start_us, int(ts[0]), int(ts[-1]),
                         relative, table.num_rows, size, table.nbytes, facts.row_group_start, facts.row_group_count)
    return entry, facts, table


def row_groups_bytes(path: Path, row_groups: list[int]) -> int:
    """The compressed bytes of these row groups of a Parquet file (an hour's share of a day file)."""
    metadata = pq.read_metadata(path)
    return sum(metadata.row_group(g).column(c).total_compressed_size for g in row_groups
               for c in range(metadata.num_columns))


def contains(whole: pa.Table, part: pa.Table) -> bool:
    """Whether ``part`` (ts-sorted ticks) stands in ``whole`` (ts-sorted) as one run, row for row."""
    if part.num_rows == 0:
        return True
    ts = as_micros(whole.column("ts"))
    first = part.column("ts").cast(pa.int64())[0].as_py()
    lo, hi = np.searchsorted(ts, [first, first], side="left")[0], np.searchsorted(ts, first, side="right")
    part = part.combine_chunks()
    return any(whole.slice(at, part.num_rows).combine_chunks().equals(part)
               for at in range(int(lo), int(hi)) if at + part.num_rows <= whole.num_rows)


def day_statistics(key: StreamKey, date: str, tables: list[pl.LazyFrame]) -> DailyStatistics:
    """Daily statistics of a stream over the given frames (all ticks of one UTC day).

    Trades: price and size. Quotes: the mid price, ignoring one-sided quotes (a price <= 0);
    mid_point: its price. Volume and VWAP are defined for trades only.
    """
    frame = pl.concat(tables, how="vertical_relaxed")
    price = tick_price(key.tick_type)
    trades = key.tick_type.family is TickFamily.TRADES
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

    settings: StorageSettings
    index: Index
    writer: SegmentWriter
    _failing: str | None = None  # why the last run stopped (storage), logged once per change
    _bad_hours: set = field(default_factory=set)  # (key, hour) already reported as failing
    _scrubbed: tuple = (-1, "", -1)  # the last hour scrub checked: (contract_id, tick_type, hour_start_us)

    @property
    def root(self) -> Path:
        return self.settings.archive_root

    def run_once(self, now: int | None = None) -> list[ArchiveEntry]:
        """Archive every hour that ended at least ``archive_delay`` before ``now`` (microseconds).

        A disk that refuses writes stops the run (the hours are tried again on the next run,
        their segments keep answering). One bad hour does not hold up later hours: an hour whose
        data is damaged beyond repair has its segments quarantined and reported; one that fails
        for another reason is reported once and tried again on every run.
        """
        now = now_us() if now is None else now
        horizon = now - duration_us(self.settings.archive_delay)
        published: list[ArchiveEntry] = []
        for key in self.writer.streams():
            for hour in self._closed_hours(key, horizon):
                try:
                    entry = self.archive_hour(key, hour)
                except (OSError, sqlite3.OperationalError, MemoryError) as exc:
                    self._storage_state(f"{type(exc).__name__}: {exc}")
                    return published
                except DamagedDataError as exc:
                    self._quarantine_hour(key, hour, exc)
                    continue
                except Exception as exc:  # a bug, say: skip the hour (its segments keep serving), go on
                    if (key, hour) not in self._bad_hours:
                        self._bad_hours.add((key, hour))
                        log.exception("archiving %s hour %s failed (%s); its segments keep answering queries, "
                                      "later hours go on, and it is tried again every run", key, iso(hour), exc)
                    continue
                if entry is not None:
                    published.append(entry)
        self.writer.coalesce_closed()  # what stays buffered: small group commits -> large compressed batches
        self._storage_state(None)
        return published

    def _storage_state(self, failure: str | None) -> None:
        if failure is not None and self._failing is None:
            log.error("archiving stopped: %s; the hours wait in their segments (which keep answering queries) and "
                      "are tried again every %s", failure, self.settings.archive_check_interval)
        elif failure is None and self._failing is not None:
            log.warning("archiving works again (it had stopped: %s)", self._failing)
        self._failing = failure

    def _quarantine_hour(self, key: StreamKey, hour: int, exc: Exception) -> None:
        """An hour whose data cannot be archived (retrying will not cure it): move its segments aside."""
        log.exception("archiving %s hour %s failed (%s); quarantining its segments, later hours go on",
                      key, iso(hour), exc)
        self.writer.seal(key, hour + US_PER_HOUR)
        segments = [p for p in self.writer.snapshot(key).closed if hour_floor(segment_start_us(p)) == hour]
        data_root = self.settings.data_root
        for path in segments:
            moved = quarantine_file(data_root, path, {"reason": f"archiving its hour failed: {type(exc).__name__}: {exc}"},
                                    keep=True)
            self.writer.on_damage(Damage(key.contract_id, key.tick_type.value, hour, hour + US_PER_HOUR - 1,
                                         path.relative_to(data_root).as_posix(), moved.relative_to(data_root).as_posix(),
                                         f"archiving failed: {type(exc).__name__}: {exc}"[:500], now_us(),
                                         moved.stat().st_size))
        self.writer.forget_segments(key, segments)

    def _closed_hours(self, key: StreamKey, horizon: int) -> list[int]:
        snapshot = self.writer.snapshot(key)
        paths = snapshot.closed + ([snapshot.open_path] if snapshot.open_path else [])
        hours = sorted({hour_floor(segment_start_us(p)) for p in paths})
        return [h for h in hours if h + US_PER_HOUR <= horizon]

    def _hour_segments(self, key: StreamKey, hour: int) -> tuple[list[Path], pa.Table]:
        """The closed segments of an hour (in ts order) and their ticks; damaged ones are repaired
        first (quarantined, readable batches kept)."""
        segments = [p for p in self.writer.snapshot(key).closed if hour_floor(segment_start_us(p)) == hour]
        batches = []
        for path in segments:
            scan = scan_segment(path)
            if not scan.whole:
                scan = self.writer.repair(scan, "damaged on disk (found when archiving)")
            batches.extend(scan.batches)
        return segments, pa.Table.from_batches(batches, schema=self.writer.schema(key))

    def archive_hour(self, key: StreamKey, hour: int) -> ArchiveEntry | None:
        """Archive one hour of a stream; None when its segments held no tick (they are removed)."""
        hour_end = hour + US_PER_HOUR
        self.writer.seal(key, hour_end)
        published = self.index.archives(key.contract_id, key.tick_type.value, hour, hour_end)
        if published:  # segments of an hour published already: never overwrite its file
            self._settle_hour(key, published[0], [p for p in self.writer.snapshot(key).closed
                                                  if hour_floor(segment_start_us(p)) == hour])
            return None
        segments, table = self._hour_segments(key, hour)
        if table.num_rows == 0:
            self.writer.forget_segments(key, segments)
            return None
        entry = self.publish_hour(key, hour, _sorted_by_ts(table))
        self.writer.forget_segments(key, segments)
        log.info(
            "archived %s hour %s: %d ticks, %d segments -> %s (%.1f bytes/tick)",
            key, iso(hour), entry.tick_count, len(segments), entry.file_path, entry.file_size_bytes / entry.tick_count,
        )
        return entry

    def publish_hour(self, key: StreamKey, hour: int, table: pa.Table, coverage: Sequence[CoverageInterval] = (),
                     source: dict | None = None) -> ArchiveEntry:
        """Steps 1-3 of archival for one hour of ticks (sorted by ``ts``, each inside the hour, none
        published for it yet): write the file atomically with its ``ibstream.archive`` metadata (plus
        ``source``, when given: where the ticks came from), then one index transaction with its
        ``tick_archives`` row, the day's statistics, its 1-minute bars and the new ``coverage`` rows.
        The archiver's path for its segments, and :mod:`storage.ib_stream_import`'s for imported hours."""
        hour_end = hour + US_PER_HOUR
        relpath = archive_relpath(key, hour)
        path = self.root / relpath
        ts = table.column("ts").cast(pa.int64())
        first_us, last_us = ts[0].as_py(), ts[-1].as_py()
        rows = sorted(self.index.coverage(key.contract_id, key.tick_type.value, hour, hour_end) + list(coverage),
                      key=lambda row: row.start_us)
        facts = FileFacts(key, hour, table.num_rows, first_us, last_us, self.contract_facts(key.contract_id),
                          coverage_facts(rows, hour, hour_end), source=source)
        file_size = self.write_atomically(table, path, facts)
        entry = ArchiveEntry(
            contract_id=key.contract_id,
            tick_type=key.tick_type.value,
            hour_start_us=hour,
            start_us=first_us,
            end_us=last_us,
            file_path=relpath,
            tick_count=table.num_rows,
            file_size_bytes=file_size,
            arrow_size_bytes=table.nbytes,
        )
        statistics = self.statistics_with(key, hour, path)
        minute_bars = ipc_bytes(partial_table(table, key.tick_type, PREAGGREGATE_US))
        self.index.publish(entry, statistics, minute_bars, coverage)
        failpoint("archive.after_publish")
        return entry

    def contract_facts(self, contract_id: int) -> dict | None:
        details = self.index.contract(contract_id)
        return None if details is None else asdict(details)

    def write_atomically(self, table: pa.Table, path: Path, facts: FileFacts, step: str = "archive") -> int:
        """Write an hour's file: ``.tmp``, fsync, rename, fsync the folder (failpoints ``{step}.after_write_tmp``
        and ``{step}.after_rename``); returns its size. Nothing names it yet: the caller publishes it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        metadata = {METADATA_KEY: json.dumps({
            "format": METADATA_FORMAT, "contract_id": facts.key.contract_id, "tick_type": facts.key.tick_type.value,
            "hour_start_us": facts.hour_start_us, "start_us": facts.start_us, "end_us": facts.end_us,
            "tick_count": facts.tick_count, "contract": facts.contract, "coverage": facts.coverage,
            **({"source": facts.source} if facts.source is not None else {})})}
        try:
            io_faults.raise_if_armed("archive.write")
            options = parquet_options(self.settings, table.schema, table)
            row_group_size = options.pop("row_group_size")
            with pq.ParquetWriter(tmp, table.schema, **options) as writer:
                writer.write_table(table, row_group_size=row_group_size)
                writer.add_key_value_metadata(metadata)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # our own unfinished copy; the segments hold the hour
            raise
        failpoint(f"{step}.after_write_tmp")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        failpoint(f"{step}.after_rename")
        return path.stat().st_size

    def statistics_with(self, key: StreamKey, hour: int, new_file: Path | None = None, *,
                         new_hours: dict[int, pa.Table] | None = None) -> DailyStatistics:
        """The statistics of the UTC day of ``hour`` over its published files, with ``new_file`` as
        that hour's (the hour in publication) and ``new_hours``' ticks as theirs (hours a backfill
        rewrites); all zero when the day has no file left."""
        day_start = hour - hour % (24 * US_PER_HOUR)
        published = self.index.archives(key.contract_id, key.tick_type.value, day_start, day_start + 24 * US_PER_HOUR)
        new = {hour: pl.scan_parquet(new_file)} if new_file is not None else {}
        new |= {h: pl.from_arrow(t).lazy() for h, t in (new_hours or {}).items()}  # type: ignore[union-attr]
        frames = [pl.scan_parquet(locate(self.root, e.file_path)) if e.row_group_count is None
                  else pl.from_arrow(read_entry(self.root, e)).lazy()  # type: ignore[union-attr]
                  for e in published if e.hour_start_us not in new]
        frames += list(new.values())
        date = f"{datetime.fromtimestamp(hour / 1e6, UTC):%Y-%m-%d}"
        if not frames:
            return DailyStatistics(key.contract_id, key.tick_type.value, date, 0, 0, None, None, None, None)
        return day_statistics(key, date, frames)

    # -- checking what is published ---------------------------------------------------------

    def check(self, entry: ArchiveEntry) -> str | None:
        """Check a published hour's file against the index; if it fails, retire it and say why."""
        path = self.root / entry.file_path
        try:
            if not path.exists():
                raise DamagedDataError(f"archive file {entry.file_path} is missing")
            check_archive_file(self.root, path, entry)
        except DamagedDataError as exc:
            self.retire(entry, str(exc))
            return str(exc)
        return None

    def retire(self, entry: ArchiveEntry, reason: str) -> None:
        """Take a failed archived hour out of service: drop its index rows (readers stop using it at
        once), quarantine its file, record the damage, recompute its day's statistics. The other
        hours of a day file are first rewritten as hourly files where they still read whole."""
        self.index.remove_archive(entry.contract_id, entry.tick_type, entry.hour_start_us)
        for other in self.index.entries_of(entry.file_path):
            self._salvage(other, reason)
        path = self.root / entry.file_path
        if path.exists():
            moved = quarantine_file(self.settings.data_root, path, {"reason": reason})
            self._record_hour_damage(entry, reason, moved.relative_to(self.settings.data_root).as_posix(),
                                     moved.stat().st_size)
        else:
            self._record_hour_damage(entry, reason)
        key = StreamKey(entry.contract_id, TickType(entry.tick_type))
        self.index.put_statistics(self.statistics_with(key, entry.hour_start_us))

    def _salvage(self, entry: ArchiveEntry, reason: str) -> None:
        """An hour of a damaged day file: into an hourly file of its own if it reads whole, else retired too."""
        key = StreamKey(entry.contract_id, TickType(entry.tick_type))
        try:
            _, facts, table = check_archive_file(self.root, self.root / entry.file_path, entry)
        except DamagedDataError as exc:
            self.index.remove_archive(entry.contract_id, entry.tick_type, entry.hour_start_us)
            self._record_hour_damage(entry, str(exc))
            return
        relpath = archive_relpath(key, entry.hour_start_us)
        size = self.write_atomically(table, self.root / relpath, FileFacts(
            key, entry.hour_start_us, table.num_rows, entry.start_us, entry.end_us,
            self.contract_facts(key.contract_id), facts.coverage))
        hourly = ArchiveEntry(entry.contract_id, entry.tick_type, entry.hour_start_us, entry.start_us, entry.end_us,
                              relpath, entry.tick_count, size, entry.arrow_size_bytes)
        self.index.swap_compacted([entry], [hourly], {entry.hour_start_us: ipc_bytes(
            partial_table(table, key.tick_type, PREAGGREGATE_US))}, now_us(), supersede=False)
        log.warning("%s hour %s moved out of the damaged day file %s into %s (%d ticks, all checked): %s",
                    key, iso(entry.hour_start_us), entry.file_path, relpath, entry.tick_count, reason)

    def _record_hour_damage(self, entry: ArchiveEntry, reason: str, quarantined: str = "", size: int = 0) -> None:
        self.index.record_damage(Damage(entry.contract_id, entry.tick_type, entry.hour_start_us,
                                        entry.hour_start_us + US_PER_HOUR - 1,
                                        (self.root / entry.file_path).relative_to(self.settings.data_root).as_posix(),
                                        quarantined, reason[:500], now_us(), size))

    def scrub(self, count: int) -> list[str]:
        """Check the next ``count`` published hours, in turn across calls; returns what failed."""
        entries = self.index.archives_all()
        if not entries:
            return []
        start = next((i for i, e in enumerate(entries) if (e.contract_id, e.tick_type, e.hour_start_us) > self._scrubbed),
                     0)
        chosen = (entries[start:] + entries[:start])[:count]
        self._scrubbed = (chosen[-1].contract_id, chosen[-1].tick_type, chosen[-1].hour_start_us)
        return [problem for entry in chosen if (problem := self.check(entry)) is not None]

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """After a crash or a lost index: finish or undo half-done archival, proving before deleting.

        * ``*.tmp`` files are removed: the segments of their hour hold every tick.
        * a ``data.parquet`` the index does not know is checked and adopted (indexed from its own
          metadata), unless segments of its hour hold ticks it lacks: then it is quarantined and
          the segments are archived again.
        * a segment of a published hour is deleted only once the file is shown to hold its every
          tick, row for row; otherwise it is quarantined and reported.
        """
        if self.root.is_dir():
            published = self.index.all_archive_paths()
            expired = self.index.expired_paths()
            superseded = {f.file_path for f in self.index.superseded()}
            for path in sorted(self.root.rglob("*")):
                relative = path.relative_to(self.root).as_posix()
                if path.name.endswith(TMP_SUFFIX):
                    path.unlink()
                    log.warning("removed unfinished archive file %s (the files it was made from hold its ticks)", path)
                elif not is_archive_file(path) or relative in published:
                    continue
                elif relative in superseded:  # compaction swapped the index and was cut off before moving it
                    move_to_superseded(self.root, relative)
                    log.info("moved archive file %s, which compaction replaced, to %s/", relative, SUPERSEDED)
                elif relative in expired:
                    log.info("archive file %s is of an hour retention expired: left for retention to delete", relative)
                else:
                    self.adopt(path)
        for key in self.writer.streams():
            self._settle_published_segments(key)

    def adopt(self, path: Path) -> list[ArchiveEntry]:
        """Index an archive file the index does not know, from its own contents; quarantine it if damaged.

        An hour the index already answers from another file (one side of a compaction cut off) is
        compared row for row: a file whose every hour is held that way is redundant and superseded;
        one that disagrees is quarantined (the indexed file keeps answering)."""
        relative = path.relative_to(self.root).as_posix()
        try:
            hours = [check_archive_file(self.root, path, facts=facts) for facts in file_facts(self.root, path)]
        except DamagedDataError as exc:
            self._quarantine_file(path, str(exc))
            return []
        if any(self._unfinished_backfill(facts) for _, facts, _ in hours):
            self._quarantine_file(path, "a backfill's file whose index swap never happened (the process was cut off): "
                                        "the hour's published file keeps answering and the gap stays; backfill it "
                                        "again", damage=False)
            return []
        new, held_by = [], set()
        for entry, facts, table in hours:
            if self.index.expired(entry.contract_id, entry.tick_type, entry.hour_start_us, entry.hour_start_us + 1):
                continue  # retention's to delete
            indexed = self.index.archives(entry.contract_id, entry.tick_type, entry.hour_start_us,
                                          entry.hour_start_us + 1)
            if indexed:
                try:
                    same = read_entry(self.root, indexed[0]).equals(table)
                except (DamagedDataError, FileNotFoundError):
                    same = False
                if not same:
                    self._quarantine_file(path, f"an archive file the index did not know, holding {facts.key} hour "
                                                f"{iso(entry.hour_start_us)} other than {indexed[0].file_path} (which "
                                                "keeps answering)", damage=False)
                    return []
                held_by.add(indexed[0].file_path)
                continue
            segments, buffered = self._hour_segments(facts.key, facts.hour_start_us)
            if segments and not (buffered.num_rows == table.num_rows and contains(table, buffered)):
                self._quarantine_file(path, f"an archive file the index did not know, for hour "
                                            f"{iso(facts.hour_start_us)} whose {len(segments)} buffered segments hold "
                                            "other ticks; the segments keep serving and are archived again",
                                      damage=False)
                return []
            new.append((entry, facts, table))
        if not new:
            if held_by:  # every hour is answered, row for row, by other files: redundant
                self.index.add_superseded([SupersededFile(relative, sorted(held_by)[0], now_us())])
                move_to_superseded(self.root, relative)
                log.warning("archive file %s holds only hours other files answer, row for row: moved to %s/ "
                            "(deleted after retention_grace)", relative, SUPERSEDED)
            return []
        day_file = new[0][1].row_groups is not None
        adopted = [self._adopt_hour(path, entry, facts, table, statistics=not day_file) for entry, facts, table in new]
        if day_file:  # the day's statistics once, over every hour now indexed
            self.index.put_statistics(self.statistics_with(new[0][1].key, new[0][1].hour_start_us))
        return adopted

    def _unfinished_backfill(self, facts: FileFacts) -> bool:
        """Whether a file storage.backfill wrote was never swapped in: the index still holds the gap it
        filled (exactly), without this backfill's stamp. (A lost index holds no such row: the file is adopted.)"""
        source = facts.source or {}
        if source.get("kind") != BACKFILL_SOURCE:
            return False
        start, end = int(source["gap_start_us"]), int(source["gap_end_us"])
        return any(row.start_us == start and row.end_us == end and row.backfilled_at_us != source["made_us"]
                   for row in self.index.coverage(facts.key.contract_id, facts.key.tick_type.value, start, end))

    def _adopt_hour(self, path: Path, entry: ArchiveEntry, facts: FileFacts, table: pa.Table, *,
                    statistics: bool) -> ArchiveEntry:
        key = facts.key
        if facts.contract and self.index.contract(key.contract_id) is None:
            self.index.upsert_contract(ContractDetails(**facts.contract))
        hour_end = facts.hour_start_us + US_PER_HOUR
        if not self.index.coverage(key.contract_id, key.tick_type.value, facts.hour_start_us, hour_end):
            self.index.add_coverage(coverage_rows(key, facts.coverage or [
                ["unknown", "index_rebuilt", entry.start_us, entry.end_us]]))
        minute_bars = ipc_bytes(partial_table(table, key.tick_type, PREAGGREGATE_US))
        self.index.publish(entry, self.statistics_with(key, facts.hour_start_us, path) if statistics else None,
                           minute_bars)
        log.warning("re-indexed archive file %s from its own contents: %s hour %s, %d ticks",
                    path.relative_to(self.root).as_posix(), key, iso(facts.hour_start_us), entry.tick_count)
        return entry

    def _settle_published_segments(self, key: StreamKey) -> None:
        snapshot = self.writer.snapshot(key)
        by_hour: dict[int, list[Path]] = {}
        for path in snapshot.closed:
            by_hour.setdefault(hour_floor(segment_start_us(path)), []).append(path)
        for hour, paths in sorted(by_hour.items()):
            entries = self.index.archives(key.contract_id, key.tick_type.value, hour, hour + US_PER_HOUR)
            if entries:
                self._settle_hour(key, entries[0], paths)

    def _settle_hour(self, key: StreamKey, entry: ArchiveEntry, paths: list[Path]) -> None:
        """Segments of a published hour: delete each one the file holds row for row, quarantine the rest."""
        try:
            archived = read_entry(self.root, entry)
        except (DamagedDataError, FileNotFoundError) as exc:
            log.error("%s hour %s is published but its file cannot be read (%s); its %d segments are kept. "
                      "Run `ibstream verify`", key, iso(entry.hour_start_us), exc, len(paths))
            return
        redundant = [p for p in paths if contains(archived, read_segments([p], archived.schema))]
        self.writer.forget_segments(key, redundant)
        for path in redundant:
            log.warning("removed segment %s: the published archive file of its hour holds its every tick", path)
        for path in paths:
            if path not in redundant:
                self._quarantine_segment(key, entry.hour_start_us, path)

    def _quarantine_segment(self, key: StreamKey, hour: int, path: Path) -> None:
        data_root = self.settings.data_root
        reason = "a segment of a published hour holding ticks its archive file lacks"
        moved = quarantine_file(data_root, path, {"reason": reason}, keep=True)
        self.writer.forget_segments(key, [path])
        scan = scan_segment(moved)
        self.index.record_damage(Damage(
            key.contract_id, key.tick_type.value, max(scan.first_ts(), hour), min(scan.last_ts(), hour + US_PER_HOUR - 1)
            if scan.rows() else hour + US_PER_HOUR - 1, path.relative_to(data_root).as_posix(),
            moved.relative_to(data_root).as_posix(), reason, now_us(), moved.stat().st_size))

    def _quarantine_file(self, path: Path, reason: str, *, damage: bool = True) -> None:
        """Move an archive file aside; with ``damage``, report its hour as damaged."""
        data_root = self.settings.data_root
        relative = path.relative_to(data_root).as_posix()
        place = hive_place(path.relative_to(self.root).as_posix())
        moved = quarantine_file(data_root, path, {"reason": reason})
        if damage and place is not None:
            key, start = place
            self.index.record_damage(Damage(key.contract_id, key.tick_type.value, start, start + US_PER_HOUR - 1, relative,
                                            moved.relative_to(data_root).as_posix(), reason[:500], now_us(),
                                            moved.stat().st_size))


def coverage_facts(rows: list[CoverageInterval], start: int, end: int) -> list:
    """Coverage rows clipped to [start, end), as kept in an archive file's metadata: ``[status, reason, start_us,
    end_us]``, and for a backfilled gap a fifth item, what the backfill said of the whole gap (so a lost index
    gets it back: :func:`coverage_rows`)."""
    clipped = []
    for row in rows:  # a row still open goes on past the hour (its end_us is only as far as confirmed yet)
        row_start = max(row.start_us, start)
        row_end = end if row.end_us is None or row.is_open else max(row_start, min(row.end_us, end))
        fact: list = [row.status, row.reason, row_start, row_end]
        if row.backfilled_at_us is not None:
            fact.append({"ticks": row.backfilled_ticks, "note": row.backfill_note, "at_us": row.backfilled_at_us})
        clipped.append(fact)
    return clipped


def coverage_rows(key: StreamKey, facts: list) -> list[CoverageInterval]:
    """The closed coverage rows an archive file's :func:`coverage_facts` describe."""
    rows = []
    for status, reason, start, end, *backfill in facts:
        said = backfill[0] if backfill else {}
        rows.append(CoverageInterval(key.contract_id, key.tick_type.value, status, reason, start, end, False,
                                     said.get("ticks"), said.get("note"), said.get("at_us")))
    return rows


def _sorted_by_ts(table: pa.Table) -> pa.Table:
    ts = as_micros(table.column("ts"))
    if len(ts) > 1 and (ts[1:] < ts[:-1]).any():
        log.warning("segments were out of ts order; sorting before archival")
        return table.sort_by("ts")
    return table.combine_chunks()
