"""Query planner: exactly the ticks of one stream in [start, end), from every layer.

Layers, oldest first: published Parquet hours (pruned through the index), closed IPC
segments, and the open segment's acknowledged batches held in memory. Readers take the
buffer snapshot *before* they read the index; since the archiver publishes an hour in the
index before it removes the hour's segments, and readers skip segments of published hours,
every tick is counted once and none is missed while writing, rotation and archival run.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ibstream.core.errors import DamagedDataError, IbstreamError
from ibstream.core.times import as_micros, hour_floor, iso
from ibstream.storage.archive import locate, open_archive_file, read_archive_file
from ibstream.storage.index import ArchiveEntry, Index
from ibstream.storage.schemas import schema_for
from ibstream.storage.segments import (
    SegmentScan,
    SegmentWriter,
    StreamKey,
    list_segments,
    resumes,
    scan_segment,
    segment_start_us,
    stream_dir,
    stream_order,
)

if TYPE_CHECKING:
    from pyarrow.dataset import ParquetFileFragment

log = logging.getLogger(__name__)


def ts_bounds(ts: pa.Array | pa.ChunkedArray, start_us: int, end_us: int) -> tuple[int, int]:
    """Row positions [lo, hi) of sorted ``ts`` that fall in [start_us, end_us)."""
    values = as_micros(ts)
    lo, hi = np.searchsorted(values, [start_us, end_us], side="left")
    return int(lo), int(hi)


def _clip(table: pa.Table | pa.RecordBatch, start_us: int, end_us: int):
    if table.num_rows == 0:
        return table
    lo, hi = ts_bounds(table.column("ts"), start_us, end_us)
    return table.slice(lo, hi - lo)


def coalesce(batches: list[pa.RecordBatch], schema: pa.Schema, batch_rows: int) -> pa.Table:
    """One table of the batches, merging runs of small batches (the recorder's group commits)."""
    if not batches:
        return schema.empty_table()
    if len(batches) > 1 and sum(b.num_rows for b in batches) / len(batches) < batch_rows / 8:
        return pa.Table.from_batches(batches, schema=schema).combine_chunks()
    return pa.Table.from_batches(batches, schema=schema)


class SegmentCache:
    """Parsed, coalesced closed segments, by path and version of the file mapped (size, inode,
    mtime): a segment grows while open, and the writer rewrites a closed one as large batches
    (same ticks, a new file renamed over it, possibly of the same size)."""

    def __init__(self, max_entries: int = 4096):
        # (path, (size, inode, mtime)) -> (table, the scan that made it, without its batches)
        self._entries: OrderedDict[tuple[Path, tuple[int, int, int]], tuple[pa.Table, SegmentScan]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self._reported: set[Path] = set()  # damaged segments already logged

    def get(self, path: Path, source: pa.MemoryMappedFile, schema: pa.Schema, batch_rows: int) -> pa.Table:
        mapped = os.fstat(source.fileno())
        key = (path, (source.size(), mapped.st_ino, mapped.st_mtime_ns))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
            # the same file, grown since (an open segment another process appends to): read on from there
            earlier = next((v for k, v in reversed(self._entries.items())
                            if k[0] == path and k[1][1] == mapped.st_ino and resumes(v[1], source.size())), None)
        scan = scan_segment(path, source, after=earlier[1] if earlier else None)
        if scan.damaged and path not in self._reported:
            self._reported.add(path)
            log.error("segment %s has damaged bytes (%s); serving its %d good batches. The archiver or "
                      "`ibstream verify` quarantines it and reports the span in coverage", path,
                      ", ".join(f"{a}-{b}" for a, b, _ in scan.damaged), len(scan.batches))
        table = coalesce(scan.batches, schema, batch_rows)
        if earlier is not None:
            table = pa.concat_tables([earlier[0], table]) if table.num_rows else earlier[0]
        with self._lock:
            for older in [k for k in self._entries if k[0] == path]:  # a growing segment: keep its newest size only
                del self._entries[older]
            self._entries[key] = (table, replace(scan, batches=[]))
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return table

    def discard(self, paths: list[Path]) -> None:
        doomed = set(paths)
        with self._lock:
            for key in [k for k in self._entries if k[0] in doomed]:
                del self._entries[key]


@dataclass
class Plan:
    """The sources that answer one stream and range; iterate it with :meth:`reader`."""

    key: StreamKey
    start_us: int
    end_us: int
    batch_rows: int
    path_of: Callable[[str], Path]  # the local file of an archive file's index path (Planner.path_of)
    archives: list[ArchiveEntry] = field(default_factory=list)
    segments: list[pa.Table] = field(default_factory=list)
    tail: pa.Table | None = None

    @property
    def schema(self) -> pa.Schema:
        return schema_for(self.key.tick_type)

    def estimated_rows(self) -> int:
        """Upper bound from archived hours' counts plus the exact buffered count."""
        return sum(e.tick_count for e in self.archives) + sum(t.num_rows for t in self._buffered())

    def estimated_bytes(self) -> int:
        return sum(e.arrow_size_bytes for e in self.archives) + sum(t.nbytes for t in self._buffered())

    def _buffered(self) -> list[pa.Table]:
        return self.segments + ([self.tail] if self.tail is not None else [])

    def batches(self) -> Iterator[pa.RecordBatch]:
        yield from self._archived()
        for table in self._buffered():
            yield from table.to_batches(max_chunksize=self.batch_rows)

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, self.batches())

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self.batches()), schema=self.schema)

    # -- archived hours ------------------------------------------------------------------------

    def _archived(self) -> Iterator[pa.RecordBatch]:
        """The archived hours' ticks, decoded by Arrow's dataset scanner on its threads ahead of the
        caller (a Flight stream sends one batch while the next decode). Windows of about WINDOW_ROWS rows
        bound the decoded data held and the files open; the next window starts when this one does."""
        clip = any(not self._whole(entry) for entry in self.archives)
        small = sum(entry.tick_count for entry in self.archives) <= DIRECT_ROWS
        windows = ((window, self._direct(window)) if small else self._scan(window) for window in self._windows())
        upcoming = next(windows, None)
        while upcoming is not None:
            (window, reader), upcoming = upcoming, next(windows, None)
            with self._named(window):
                for batch in reader:
                    batch = _clip(batch, self.start_us, self.end_us) if clip else batch
                    if batch.num_rows:
                        yield batch.replace_schema_metadata(self.schema.metadata)

    def _windows(self) -> Iterator[list[list[ArchiveEntry]]]:
        """Runs of consecutive hours in one file (a day file is read as one source), grouped up to
        WINDOW_ROWS rows."""
        window: list[list[ArchiveEntry]] = []
        rows = 0
        for entry in self.archives:
            if window and window[-1][0].file_path == entry.file_path:
                window[-1].append(entry)
            else:
                if rows >= WINDOW_ROWS:
                    yield window
                    window, rows = [], 0
                window.append([entry])
            rows += entry.tick_count
        if window:
            yield window

    def _scan(self, window: list[list[ArchiveEntry]]) -> tuple[list[list[ArchiveEntry]], pa.RecordBatchReader]:
        """The window's row groups as one reader (started: it decodes ahead from now)."""
        with self._named(window):
            fragments = [fragment for run in window if (fragment := self._fragment(run)) is not None]
            ds, parquet_format = _parquet_format()
            scanner = ds.FileSystemDataset(fragments, self.schema, parquet_format).scanner(
                batch_size=self.batch_rows, use_threads=True)
            return window, scanner.to_reader()

    def _direct(self, window: list[list[ArchiveEntry]]) -> Iterator[pa.RecordBatch]:
        """A small plan's row groups, read here (a scanner takes ~1 ms to start: more than it saves)."""
        for run in window:
            parquet = open_archive_file(self.path_of(run[0].file_path))
            groups = self._groups(run, parquet)
            if groups != []:
                yield from parquet.read_row_groups(range(parquet.num_row_groups) if groups is None else groups,
                                                   use_threads=True).to_batches(max_chunksize=self.batch_rows)

    def _fragment(self, run: list[ArchiveEntry]) -> ParquetFileFragment | None:
        """The run's file as a fragment over the row groups of the range (None: none of them)."""
        groups = self._groups(run)
        if groups == []:
            return None  # its hours overlap the range, their ticks do not (row group statistics)
        fragment = _parquet_format()[1].make_fragment(pa.memory_map(str(self.path_of(run[0].file_path))))
        # subset, not make_fragment(row_groups=): that one keeps them in set order ({7, 8} reads 8 first);
        # subset sorts them, and a file holds its hours in time order
        return fragment if groups is None else fragment.subset(row_group_ids=groups)

    def _whole(self, entry: ArchiveEntry) -> bool:
        return entry.start_us >= self.start_us and entry.end_us < self.end_us

    def _groups(self, run: list[ArchiveEntry], parquet: pq.ParquetFile | None = None) -> list[int] | None:
        """The row groups of a run that hold ticks of the range (None: all of an hourly file); ``parquet`` is
        its file, if open already."""
        if all(self._whole(entry) for entry in run):
            return None if any(entry.row_groups is None for entry in run) else \
                [group for entry in run for group in entry.row_groups or ()]
        parquet = parquet or open_archive_file(self.path_of(run[0].file_path))  # the footer's statistics
        groups: list[int] = []
        for entry in run:
            candidates = entry.row_groups if entry.row_groups is not None else list(range(parquet.num_row_groups))
            groups += candidates if self._whole(entry) else self._overlapping_groups(parquet, candidates)
        return groups

    @contextmanager
    def _named(self, window: list[list[ArchiveEntry]]) -> Iterator[None]:
        """Reading ``window``: a file that fails is a :class:`DamagedDataError` naming its hour."""
        try:
            yield
        except IbstreamError:
            raise  # the object store did not answer (a read server): not damage
        except (OSError, pa.ArrowException) as exc:
            raise self._damage(window, exc) from None

    def _damage(self, window: list[list[ArchiveEntry]], exc: Exception) -> DamagedDataError:
        """What the window's failure destroyed: the first of its hours that cannot be read alone."""
        culprit, cause = window[0][0], exc
        for entry in (entry for run in window for entry in run):
            try:
                read_archive_file(self.path_of(entry.file_path), entry.file_path, entry.row_groups)
            except (OSError, DamagedDataError) as failed:
                culprit, cause = entry, failed
                break
        return DamagedDataError(
            f"the archive file of {self.key} hour {iso(culprit.hour_start_us)} ({culprit.file_path}) cannot be "
            f"read: {cause}. Run `ibstream verify` on the recording host: it quarantines the file and reports the "
            "span in coverage (restore it from a backup, then `ibstream reindex`)")

    def _overlapping_groups(self, parquet: pq.ParquetFile, candidates: list[int]) -> list[int]:
        column = parquet.schema_arrow.get_field_index("ts")
        groups = []
        for i in candidates:
            stats = parquet.metadata.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max:
                groups.append(i)
                continue
            low, high = _stat_us(stats.min), _stat_us(stats.max)
            if high >= self.start_us and low < self.end_us:
                groups.append(i)
        return groups


# archived rows per scanner window: a window decodes whole whatever the reader's pace, and two are under way at
# most, so a stream holds up to ~1.1M decoded rows (72 MB of the bench day's bid_ask, measured) and two windows'
# files open
WINDOW_ROWS = 1 << 19
DIRECT_ROWS = 1 << 17  # plans of up to this many archived rows (two busy hours) skip the scanner


@functools.cache
def _parquet_format():
    """Archive files for Arrow's scanner, their pages checked against their CRCs as they are read (as
    open_archive_file's are). Imported on first use: pyarrow.dataset imports pandas (~0.5 s)."""
    import pyarrow.dataset as ds

    return ds, ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))


def _stat_us(value) -> int:
    return value if isinstance(value, int) else pa.scalar(value, pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py()


class Planner:
    """Builds :class:`Plan` objects over an index, a buffer folder and (in the recording
    process) the live segment writer."""

    def __init__(self, index: Index, buffer_root: Path, archive_root: Path, writer: SegmentWriter | None,
                 refuse_expired: Callable[[StreamKey, int, int], None] | None = None,
                 fetch: Callable[[str], Path] | None = None):
        """``fetch`` (a read server's) gives the local copy of an archive file named by the index."""
        self.index = index
        self.fetch = fetch
        self.refuse_expired = refuse_expired  # raises for a range whose raw ticks expired (storage.retention)
        self.buffer_root = buffer_root
        self.archive_root = archive_root
        self.writer = writer
        self.cache = SegmentCache()
        if writer is not None:
            writer.forget_listeners.append(self.cache.discard)

    def plan(self, key: StreamKey, start_us: int, end_us: int, batch_rows: int, subscription=None) -> Plan:
        """The sources of [start_us, end_us); a ``subscription`` (recording process only) is offered
        every batch acknowledged after this plan's snapshot."""
        if self.refuse_expired is not None:
            self.refuse_expired(key, start_us, end_us)
        schema = schema_for(key.tick_type)
        sources, tail, open_path = self._buffer_snapshot(key, start_us, end_us, subscription)
        archives = self.index.archives(key.contract_id, key.tick_type.value, start_us, end_us)
        archived_hours = {e.hour_start_us for e in archives}
        if open_path is not None and hour_floor(segment_start_us(open_path)) in archived_hours:
            tail = []  # its hour was sealed and published after the snapshot: the archive has these ticks
        segments = []
        for path, source in sources:
            if hour_floor(segment_start_us(path)) in archived_hours:
                continue
            table = self.cache.get(path, source, schema, batch_rows)
            clipped = _clip(table, start_us, end_us)
            if clipped.num_rows:
                segments.append((clipped, path))
        segments = [t for t, _ in sorted(segments, key=lambda s: stream_order(s[0]["ts"][0].value,
                                                                               s[0]["ts"][-1].value, s[1]))]
        tail_table = _clip(coalesce(tail, schema, batch_rows), start_us, end_us) if tail else None
        return Plan(key, start_us, end_us, batch_rows, self.path_of, archives, segments, tail_table)

    def path_of(self, relative: str) -> Path:
        """Where to read an archive file named by the index: a read server's local copy, the archive, or
        (compaction replaced it a moment ago) superseded/."""
        return self.fetch(relative) if self.fetch is not None else locate(self.archive_root, relative)

    def _buffer_snapshot(self, key: StreamKey, start_us: int, end_us: int, subscription=None
                         ) -> tuple[list[tuple[Path, pa.MemoryMappedFile]], list[pa.RecordBatch], Path | None]:
        """Open (memory-map) the closed segments of hours in [start_us, end_us) and copy the open
        tail (with its segment's path), atomically w.r.t. archival."""
        first_hour = hour_floor(start_us)

        def wanted(path: Path) -> bool:
            return first_hour <= hour_floor(segment_start_us(path)) < end_us

        if self.writer is not None:
            with self.writer.stream_state(key, subscription) as snapshot:
                sources = [(p, pa.memory_map(str(p), "r")) for p in snapshot.closed if wanted(p)]
                return sources, snapshot.open_batches, snapshot.open_path
        sources = []
        for path in filter(wanted, list_segments(stream_dir(self.buffer_root, key))):
            try:
                sources.append((path, pa.memory_map(str(path), "r")))
            except FileNotFoundError:
                continue  # archived meanwhile: the index, read after this, has its hour
        return sources, [], None


