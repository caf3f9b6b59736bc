"""Retention: raw ticks older than their stream's ``ticks_days`` leave the archive; their 1-minute
pre-aggregates (so bars of 1m and up), daily statistics and coverage stay for ever.

Expiring an hour takes two steps, each safe to be killed at:

1. **Index.** One transaction moves the hour's row from ``tick_archives`` to ``expired_hours``.
   From then on no new read plans the file; a query that reaches into the hour for raw ticks gets
   :class:`~ibstream.core.errors.ExpiredDataError` ("expired", not an empty frame).
2. **File.** ``retention_grace`` later (a reader that planned the file just before step 1 reads it
   whole meanwhile), the file is deleted and the row marked ``file_removed``. A file of an expired
   hour found on recovery is the policy's to delete, never re-adopted.

A crash between the two leaves a file the next run deletes; a crash inside step 1 leaves the hour
archived, expired again on the next run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ibstream.core.errors import ExpiredDataError
from ibstream.core.times import MAX_US, US_PER_HOUR, duration_us, iso, now_us
from ibstream.storage.archive import read_entry, remove_empty_dirs
from ibstream.storage.bars import PREAGGREGATE_US, partial_table
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint
from ibstream.storage.index import ArchiveEntry, ExpiredHour, Index
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, fsync_dir, ipc_bytes

log = logging.getLogger(__name__)
US_PER_DAY = 24 * US_PER_HOUR


@dataclass
class PruneReport:
    """What a prune run expired (or, as a dry run, would expire) and which files it deleted."""

    hours: list[ArchiveEntry] = field(default_factory=list)
    files_removed: int = 0
    bytes_removed: int = 0

    @property
    def ticks(self) -> int:
        return sum(e.tick_count for e in self.hours)

    @property
    def bytes(self) -> int:
        return sum(e.file_size_bytes for e in self.hours)


def horizon_us(settings: StorageSettings, key: StreamKey, now: int) -> int | None:
    """Hours ending at or before this time have expired raw ticks (None: the stream keeps them all)."""
    days = settings.ticks_days(key.contract_id, key.tick_type.value)
    return None if days is None else now - days * US_PER_DAY


def due(settings: StorageSettings, index: Index, now: int) -> list[ArchiveEntry]:
    """Archived hours past their stream's retention at ``now``, oldest first per stream."""
    if not settings.retention:
        return []
    hours = []
    for contract_id, tick_type in sorted(index.archived_until()):  # per stream: one indexed query up to its horizon
        horizon = horizon_us(settings, StreamKey(contract_id, TickType(tick_type)), now)
        if horizon is not None:
            hours += [e for e in index.archives(contract_id, tick_type, 0, horizon)
                      if e.hour_start_us + US_PER_HOUR <= horizon]
    return hours


def prune(settings: StorageSettings, index: Index, now: int | None = None, *, apply: bool = True,
          on_expired=None) -> PruneReport:
    """Expire what retention says (step 1), then delete the files of hours expired longer than
    ``retention_grace`` ago (step 2). ``apply=False``: report only. ``on_expired`` is called after
    step 1 (the store clears its result cache there)."""
    now = now_us() if now is None else now
    report = PruneReport(due(settings, index, now))
    if not apply:
        return report
    if report.hours:
        _keep_minute_bars(settings, index, report.hours)
        index.expire(report.hours, now)
        failpoint("prune.after_index")
        if on_expired is not None:
            on_expired()
        by_stream: dict[tuple[int, str], list[ArchiveEntry]] = {}
        for entry in report.hours:
            by_stream.setdefault((entry.contract_id, entry.tick_type), []).append(entry)
        for (contract_id, tick_type), hours in sorted(by_stream.items()):
            log.info("retention: %d/%s: expired %d hours of raw ticks (%s .. %s, %s ticks); their 1-minute bars, "
                     "statistics and coverage stay", contract_id, tick_type, len(hours), iso(hours[0].hour_start_us),
                     iso(hours[-1].hour_start_us + US_PER_HOUR), f"{sum(h.tick_count for h in hours):,}")
    removed = remove_files(settings, index, now)
    report.files_removed, report.bytes_removed = len(removed), sum(size for _, size in removed)
    return report


def _keep_minute_bars(settings: StorageSettings, index: Index, hours: list[ArchiveEntry]) -> None:
    """Compute the 1-minute pre-aggregates of hours archived before they existed: after expiry,
    they are all that is left of the hour."""
    for entry in hours:
        if not index.hour_bars(entry.contract_id, entry.tick_type, entry.hour_start_us, entry.hour_start_us + 1):
            ticks = read_entry(settings.archive_root, entry)
            key = StreamKey(entry.contract_id, TickType(entry.tick_type))
            index.put_hour_bars(entry.contract_id, entry.tick_type, entry.hour_start_us,
                                ipc_bytes(partial_table(ticks, key.tick_type, PREAGGREGATE_US)))


def remove_files(settings: StorageSettings, index: Index, now: int) -> list[tuple[ExpiredHour, int]]:
    """Delete the files of hours expired at least ``retention_grace`` ago (step 2); a day file only
    once every hour it holds has (it answers for the others until then)."""
    before = now - duration_us(settings.retention_grace)
    by_file: dict[str, list[ExpiredHour]] = {}
    for hour in index.expired(files_left_before_us=before):
        by_file.setdefault(hour.file_path, []).append(hour)
    still_needed = index.all_archive_paths() | {h.file_path for h in index.expired()
                                                if not h.file_removed and h.expired_at_us > before}
    removed: list[tuple[ExpiredHour, int]] = []
    for relative, hours in sorted(by_file.items()):
        if relative in still_needed:
            continue
        path = settings.archive_root / relative
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        removed.extend((hour, size if i == 0 else 0) for i, hour in enumerate(hours))
        failpoint("prune.after_unlink")
        remove_empty_dirs(path.parent, settings.archive_root)
    if removed:
        index.mark_removed([hour for hour, _ in removed])
        log.info("retention: deleted %d expired archive files (%.1f MB)", len(removed),
                 sum(size for _, size in removed) / 2**20)
    return removed


def refuse_expired(index: Index, settings: StorageSettings, key: StreamKey, start_us: int, end_us: int) -> None:
    """Raise :class:`ExpiredDataError` if raw ticks of [start_us, end_us) expired."""
    hours = index.expired(key.contract_id, key.tick_type.value, start_us, end_us)
    if hours:
        until = hours[-1].hour_start_us + US_PER_HOUR
        days = settings.ticks_days(key.contract_id, key.tick_type.value)
        rule = f" (retention: {days} days, IBSTREAM_RETENTION)" if days is not None else ""
        raise ExpiredDataError(
            f"the raw ticks of {key} from {iso(hours[0].hour_start_us)} to {iso(until)} expired{rule}: "
            f"{len(hours)} hours of [{iso(start_us)}, {iso(end_us) if end_us <= MAX_US else 'now'}) are gone; their "
            "1-minute bars and "
            "up, daily statistics and coverage are kept: ask for bars (resolution '1m' or more, on whole minutes) "
            f"or start at {iso(until)} or later")
