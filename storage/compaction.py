"""Compaction: the hourly archive files of a closed UTC day merge into one file per stream and day.

A year of one contract's four tick types is 35,000 hourly files; compacted, 1,460. The day file
(``date=YYYY-MM-DD/hour=all/day-{made_us}.parquet``, still read by ``pl.scan_parquet`` and DuckDB
with partitions, ``hour`` then being text) holds each hour as its own run of row groups, and the
index names each hour's row groups, so a query still reads only the hours it needs.

The steps, each safe to be killed at, and what answers queries after a kill there:

1. write ``day-….parquet.tmp`` hour by hour from the checked hourly files, fsync, then read it
   back and compare every hour row for row with its source       -> the hourly files (tmp removed on start)
2. rename it into place, fsync the folder                         -> the hourly files (on start the day
                                                                     file, whose every hour the index answers
                                                                     from files holding the same rows, is
                                                                     superseded and later deleted)
3. one index transaction: each hour's row names the day file's     -> the day file; a reader that planned
   row groups, its 1-minute bars are recomputed from the day file,     the hourly files before still reads them
   the hourly files are listed in ``superseded_files``
4. move the hourly files to ``{data_root}/superseded/``           -> the day file (on start, listed files
   (outside engines reading the archive folder stop seeing them;       still in the archive are moved)
   our readers that planned them find them there)
5. ``retention_grace`` later, delete them and their rows.

Nothing is deleted that the index does not name as replaced by a file proven to hold the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ibstream.core.errors import DamagedDataError
from ibstream.core.times import US_PER_HOUR, duration_us, iso, now_us
from ibstream.storage.archive import (
    METADATA_FORMAT,
    METADATA_KEY,
    SUPERSEDED,
    TMP_SUFFIX,
    coverage_facts,
    day_relpath,
    file_facts,
    locate,
    move_to_superseded,
    parquet_options,
    read_archive_file,
    read_entry,
    remove_empty_dirs,
    row_groups_bytes,
    superseded_path,
)
from ibstream.storage.bars import PREAGGREGATE_US, partial_table
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint, io_faults
from ibstream.storage.index import ArchiveEntry, Index
from ibstream.storage.schemas import TickType, schema_for
from ibstream.storage.segments import SegmentWriter, StreamKey, fsync_dir, ipc_bytes, segment_start_us

log = logging.getLogger(__name__)
US_PER_DAY = 24 * US_PER_HOUR
Progress = Callable[[Iterable, str, int], Iterable]


@dataclass(frozen=True)
class DayPlan:
    """One stream's closed day to compact: its archived hours (several files)."""

    key: StreamKey
    day_start_us: int
    entries: tuple[ArchiveEntry, ...]

    @property
    def files(self) -> int:
        return len({e.file_path for e in self.entries})

    @property
    def ticks(self) -> int:
        return sum(e.tick_count for e in self.entries)


@dataclass
class CompactReport:
    """What a run compacted (or, as a dry run, would) and which replaced files it deleted."""

    days: list[DayPlan] = field(default_factory=list)
    files_written: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def files_before(self) -> int:
        return sum(d.files for d in self.days)

    @property
    def ticks(self) -> int:
        return sum(d.ticks for d in self.days)


def _quiet(items: Iterable, description: str, total: int) -> Iterable:
    return items


def due(settings: StorageSettings, index: Index, writer: SegmentWriter | None, now: int) -> list[DayPlan]:
    """Days that ended ``compact_delay`` before ``now``, are archived whole (no segment of them is
    buffered) and whose hours live in more than one file; by stream and day."""
    horizon = now - duration_us(settings.compact_delay)
    days = {(StreamKey(cid, TickType(tt)), day): index.archives(cid, tt, day, day + US_PER_DAY)
            for cid, tt, day in index.split_days(horizon)}
    buffered: set[tuple[StreamKey, int]] = set()
    if writer is not None:
        for key in writer.streams():
            snapshot = writer.snapshot(key)
            for path in snapshot.closed + ([snapshot.open_path] if snapshot.open_path else []):
                start = segment_start_us(path)
                buffered.add((key, start - start % US_PER_DAY))
    return [DayPlan(key, day, tuple(entries)) for (key, day), entries in sorted(days.items())
            if (key, day) not in buffered]


def compact(settings: StorageSettings, index: Index, writer: SegmentWriter | None = None, now: int | None = None, *,
            apply: bool = True, on_rewritten: Callable[[], None] | None = None,
            progress: Progress = _quiet) -> CompactReport:
    """Compact every day :func:`due` names (``apply=False``: report only), then delete the replaced
    files whose grace period is over. A damaged source file stops its day (left to scrub or
    ``ibstream verify``, which quarantine it); the other days go on."""
    now = now_us() if now is None else now
    report = CompactReport(due(settings, index, writer, now))
    if not apply:
        return report
    for day in progress(report.days, "compacting days", len(report.days)):
        try:
            compact_day(settings, index, day, now)
        except (OSError, sqlite3.OperationalError) as exc:  # a full disk, say: nothing changed; the next run retries
            report.failed.append(f"{day.key} day {iso(day.day_start_us)[:10]}: {type(exc).__name__}: {exc}")
            log.error("compaction stopped at %s day %s: %s: %s; the hourly files keep answering, the next run "
                      "tries again", day.key, iso(day.day_start_us)[:10], type(exc).__name__, exc)
            break
        except DamagedDataError as exc:
            report.failed.append(str(exc))
            log.error("compaction of %s day %s stopped: %s; its hourly files keep answering. Run `ibstream verify` "
                      "to quarantine what is damaged", day.key, iso(day.day_start_us)[:10], exc)
            continue
        report.files_written += 1
        if on_rewritten is not None:
            on_rewritten()
    removed = remove_superseded(settings, index, now)
    report.files_removed, report.bytes_removed = len(removed), sum(size for _, size in removed)
    return report


def compact_day(settings: StorageSettings, index: Index, day: DayPlan, now: int) -> list[ArchiveEntry]:
    """Steps 1-4 for one stream's day; returns the day file's index rows."""
    root = settings.archive_root
    key = day.key
    made = now
    while (root / day_relpath(key, day.day_start_us, made)).exists():  # the day compacted again at the same `now`:
        made += 1  # never replace the day file this one is read from
    relpath = day_relpath(key, day.day_start_us, made)
    path = root / relpath
    tmp = path.with_name(path.name + TMP_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema_for(key.tick_type)
    first_hour = _source(root, day.entries[0])  # read before the day file exists: its prices choose the encoding
    options = parquet_options(settings, schema, first_hour)
    row_group_size = options.pop("row_group_size")
    layout: list[tuple[ArchiveEntry, int, int]] = []  # (entry, first row group, row groups)
    hours_meta = []
    try:
        with pq.ParquetWriter(tmp, schema, **options) as out:
            groups = 0
            for i, entry in enumerate(day.entries):
                table = first_hour if i == 0 else _source(root, entry)
                origin = next((f.source for f in file_facts(root, locate(root, entry.file_path))
                               if f.hour_start_us == entry.hour_start_us), None)
                count = -(-table.num_rows // row_group_size)
                io_faults.raise_if_armed("compact.write")  # a disk that fills while the day file grows
                out.write_table(table, row_group_size=row_group_size)
                layout.append((entry, groups, count))
                hours_meta.append({
                    "hour_start_us": entry.hour_start_us, "start_us": entry.start_us, "end_us": entry.end_us,
                    "tick_count": entry.tick_count, "row_group_start": groups, "row_group_count": count,
                    "coverage": coverage_facts(index.coverage(key.contract_id, key.tick_type.value, entry.hour_start_us,
                                                              entry.hour_start_us + US_PER_HOUR),
                                               entry.hour_start_us, entry.hour_start_us + US_PER_HOUR),
                    **({"source": origin} if origin is not None else {})})  # an imported hour says where from
                groups += count
            details = index.contract(key.contract_id)
            out.add_key_value_metadata({METADATA_KEY: json.dumps({
                "format": METADATA_FORMAT, "kind": "day", "contract_id": key.contract_id,
                "tick_type": key.tick_type.value, "day_start_us": day.day_start_us, "hours": hours_meta,
                "contract": None if details is None else details.__dict__})})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        failpoint("compact.after_write_tmp")
        new, minute_bars = [], {}
        for entry, first, count in layout:  # proof before the swap: every hour row for row
            rows = list(range(first, first + count))
            written = read_archive_file(tmp, relpath, rows)
            if not written.equals(_source(root, entry)):
                raise DamagedDataError(f"the day file written for {key} hour {iso(entry.hour_start_us)} does not read "
                                       "back equal to its hourly file; nothing was swapped")
            new.append(ArchiveEntry(entry.contract_id, entry.tick_type, entry.hour_start_us, entry.start_us,
                                    entry.end_us, relpath, entry.tick_count, row_groups_bytes(tmp, rows),
                                    entry.arrow_size_bytes, first, count))
            minute_bars[entry.hour_start_us] = ipc_bytes(partial_table(written, key.tick_type, PREAGGREGATE_US))
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours, never named by the index; the hourly files answer
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    failpoint("compact.after_rename")
    try:
        index.swap_compacted(list(day.entries), new, minute_bars, now)
    except BaseException:
        path.unlink(missing_ok=True)  # the swap did not happen: no reader was ever given this file
        raise
    failpoint("compact.after_index")
    for relative in sorted({e.file_path for e in day.entries}):
        move_to_superseded(root, relative)
        failpoint("compact.after_move")
    log.info("compacted %s day %s: %d files -> %s (%s ticks, %.1f MB)", key, iso(day.day_start_us)[:10], day.files,
             relpath, f"{day.ticks:,}", path.stat().st_size / 2**20)
    return new


def _source(root, entry: ArchiveEntry) -> pa.Table:
    table = read_entry(root, entry)
    if table.num_rows != entry.tick_count:
        raise DamagedDataError(f"archive file {entry.file_path} holds {table.num_rows} ticks of hour "
                               f"{iso(entry.hour_start_us)} where the index says {entry.tick_count}")
    return table


def remove_superseded(settings: StorageSettings, index: Index, now: int) -> list[tuple[str, int]]:
    """Step 5: delete the files compaction replaced at least ``retention_grace`` ago."""
    doomed = index.superseded(before_us=now - duration_us(settings.retention_grace))
    live = index.all_archive_paths()
    removed = []
    for item in doomed:
        if item.file_path not in live:  # (a path named again since, e.g. by a rebuilt index, stays where it is)
            move_to_superseded(settings.archive_root, item.file_path)  # in case step 4 was cut off
        path = superseded_path(settings.archive_root, item.file_path)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        failpoint("compact.after_unlink")
        remove_empty_dirs(path.parent, settings.archive_root.parent / SUPERSEDED)
        index.forget_superseded([item.file_path])
        removed.append((item.file_path, size))
    if removed:
        log.info("compaction: deleted %d replaced hourly files (%.1f MB)", len(removed),
                 sum(size for _, size in removed) / 2**20)
    return removed
