"""Operator's tools over a data root: rebuild the index, verify every file, make a backup.

All three are crash-safe (a kill -9 at any point leaves the store as it was, or as it will be)
and never delete what they cannot prove redundant:

* :func:`reindex` builds a new ``index.sqlite`` from the archive and buffer files beside the old
  one, then swaps it in; the old one goes to the quarantine.
* :func:`verify` opens the store for writing (start-up recovery checks every segment), then
  checks every archived hour against the index and quarantines what fails.
* :func:`backup` copies a consistent store (SQLite's online backup of the index, the files it
  names, the buffer) into a new folder, while a recorder may go on recording.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ibstream.core.errors import CorruptFileError, StorageError
from ibstream.core.times import US_PER_HOUR, now_us, to_us
from ibstream.storage.archive import Archiver, archive_files, locate
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint
from ibstream.storage.index import COVERED, Index
from ibstream.storage.quarantine import Damage, quarantine_file
from ibstream.storage.segments import SUFFIX, SegmentWriter, StreamKey, fsync_dir
from ibstream.storage.store import Store, lock_data_root

log = logging.getLogger(__name__)

REBUILD_SUFFIX = ".rebuild"
BACKUP_MARK = "BACKUP-IN-PROGRESS"
Progress = Callable[[Iterable, str, int], Iterable]  # (items, description, total) -> the items, reported


def _quiet(items: Iterable, description: str, total: int) -> Iterable:
    return items


@dataclass
class Report:
    """What a maintenance run did: counts, and one line per problem found."""

    files: int = 0
    ticks: int = 0
    problems: list[str] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damage


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


# ---------------------------------------------------------------------------------------------
# reindex


def require_store(settings: StorageSettings) -> None:
    """Refuse a data root that holds no store (a mistyped --data-root must not create one)."""
    root = settings.data_root
    if not any(p.exists() for p in (settings.index_path, settings.buffer_root, settings.archive_root)):
        raise StorageError(f"{root} holds no ibstream store (no index.sqlite, buffer/ or archive/); "
                           "check --data-root or IBSTREAM_DATA_ROOT")


def reindex(settings: StorageSettings, progress: Progress = _quiet) -> Report:
    """Rebuild ``index.sqlite`` from the files: archived hours (from each file's own metadata),
    their statistics and 1-minute pre-aggregates; contracts, coverage and damage records from the
    old index when it can still be read, else from the files' metadata (spans no file
    describes are coverage ``unknown``). Needs the data root's writer lock."""
    require_store(settings)
    lock = lock_data_root(settings.data_root)
    try:
        return _reindex(settings, progress)
    finally:
        lock.close()


def _reindex(settings: StorageSettings, progress: Progress) -> Report:
    report = Report()
    target = settings.index_path
    rebuild = target.with_name(target.name + REBUILD_SUFFIX)
    for leftover in [rebuild, *_sidecars(rebuild)]:
        leftover.unlink(missing_ok=True)  # an earlier rebuild that was cut off: ours, never in service
    new = Index(rebuild)
    old = _readable_index(target, report)
    if old is not None:
        _carry_over(old, new)
    writer = SegmentWriter(settings, on_damage=new.record_damage)
    archiver = Archiver(settings, new, writer)
    files = archive_files(settings.archive_root)
    for path in progress(files, "re-indexing archive files", len(files)):
        entries = archiver.adopt(path)
        if entries:
            report.files += 1
            report.ticks += sum(entry.tick_count for entry in entries)
    archiver.recover()  # segments of published hours, proven redundant or quarantined
    if old is not None:
        _report_missing(old, new, report)
        old.close()
    report.damage = new.damage()
    writer.close()
    new.close()
    failpoint("reindex.before_swap")
    if target.exists():
        quarantine_file(settings.data_root, target, {"reason": "replaced by `ibstream reindex`"}, keep=True,
                        level=logging.INFO)
    for sidecar in _sidecars(target):
        if sidecar.exists():
            quarantine_file(settings.data_root, sidecar, {"reason": "replaced by `ibstream reindex`"},
                            level=logging.INFO)
    os.replace(rebuild, target)
    fsync_dir(target.parent)
    log.info("rebuilt %s: %d archive files, %d ticks", target, report.files, report.ticks)
    return report


def _readable_index(path: Path, report: Report) -> Index | None:
    if not path.exists():
        report.problems.append(f"{path.name} was missing: contracts and coverage come from the archive files")
        return None
    try:
        index = Index(path)
        if problems := index.integrity_problems():
            raise CorruptFileError("; ".join(problems[:5]))
        return index
    except (CorruptFileError, OSError) as exc:
        report.problems.append(f"{path.name} could not be read ({exc}): contracts and coverage come from the files")
        return None


def _carry_over(old: Index, new: Index) -> None:
    for details in old.contracts():
        new.upsert_contract(details)
    columns = ("contract_id, tick_type, status, reason, start_us, end_us, is_open, backfilled_ticks, backfill_note, "
               "backfilled_at_us")
    rows = old._connection().execute(f"SELECT {columns} FROM coverage ORDER BY id")
    new._connection().executemany(f"INSERT INTO coverage ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  rows.fetchall())
    for damage in old.damage():
        new.record_damage(damage)
    # what retention expired stays expired (a file in its grace period is not re-adopted), and what
    # compaction replaced stays replaced
    new._connection().executemany("INSERT OR REPLACE INTO expired_hours VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  old._connection().execute("SELECT * FROM expired_hours").fetchall())
    new.add_superseded(old.superseded())


def _report_missing(old: Index, new: Index, report: Report) -> None:
    """Hours the old index published whose file is gone: reported as damage, not silently dropped."""
    known = new.all_archive_paths()
    rows = old._connection().execute(
        "SELECT contract_id, tick_type, hour_start_us, start_us, end_us, file_path FROM tick_archives")
    for contract_id, tick_type, hour, start, end, file_path in rows:
        if file_path not in known:
            damage = Damage(contract_id, tick_type, start, end, f"archive/{file_path}", "",
                            "archive file missing: the old index published it, no file holds it", now_us())
            new.record_damage(damage)
            report.problems.append(f"archive/{file_path} is missing (hour {hour // US_PER_HOUR})")


# ---------------------------------------------------------------------------------------------
# verify


def verify(settings: StorageSettings, progress: Progress = _quiet) -> Report:
    """Check every file: segments (checksums, on opening the store), archive files against the
    index (page CRCs, decoding, counts, ``ts`` order and bounds, sizes) and the index itself.
    What fails is quarantined and reported as damaged in coverage."""
    require_store(settings)
    report = Report()
    before: set[Damage] = set()
    if settings.index_path.exists():  # a damaged index is refused here, naming `ibstream reindex`
        index = Index(settings.index_path)
        before = set(index.damage())
        index.close()
    with Store(settings) as store:  # start-up recovery checks every segment (and may find damage)
        report.problems += [f"index: {p}" for p in store.index.integrity_problems()]
        entries = store.index.archives_all()
        for entry in progress(entries, "verifying archive files", len(entries)):
            problem = store.check_archived(entry)
            if problem is not None:
                report.problems.append(problem)
                continue
            report.files += 1
            report.ticks += entry.tick_count
        report.damage = [d for d in store.index.damage() if d not in before]
    return report


# ---------------------------------------------------------------------------------------------
# backup


def backup(settings: StorageSettings, destination: Path, progress: Progress = _quiet) -> Report:
    """Copy the store to ``destination`` (a new folder) consistently, while it may be recording.

    Order: the buffer segments first, then SQLite's online backup of the index, then every
    archive file that backup names. A segment the archiver removes during the copy had its hour
    published before the index was copied, so the copy holds that hour's file instead; a segment
    copied and also archived is proven redundant and removed when the copy is opened. The copy is
    built in ``{destination}.partial`` and renamed into place when complete.
    """
    require_store(settings)
    if destination.exists() and any(destination.iterdir()):
        raise StorageError(f"backup destination {destination} exists and is not empty; name a new folder")
    partial = destination.with_name(destination.name + ".partial")
    if partial.exists():
        if not (partial / BACKUP_MARK).exists():
            raise StorageError(f"{partial} exists and is not an unfinished ibstream backup; move it away")
        shutil.rmtree(partial)  # an earlier backup that was cut off: a copy, never the only one
    partial.mkdir(parents=True)
    (partial / BACKUP_MARK).write_text("an ibstream backup is being written here; it is incomplete\n")
    report = Report()
    segments = sorted(settings.buffer_root.rglob(f"*{SUFFIX}")) if settings.buffer_root.is_dir() else []
    for path in progress(segments, "copying buffer segments", len(segments)):
        _copy(path, partial / path.relative_to(settings.data_root), report, missing_ok=True)
    failpoint("backup.after_segments")
    index = Index(settings.index_path, read_only=True)
    try:
        copied = partial / settings.index_path.name
        index.backup_to(copied)
    finally:
        index.close()
    snapshot = Index(copied)
    entries = snapshot.archives_all()
    snapshot.close()
    for leftover in _sidecars(copied):
        leftover.unlink(missing_ok=True)
    files: dict[str, int] = {}  # a compacted day file answers for several hours
    for entry in entries:
        files[entry.file_path] = files.get(entry.file_path, 0) + entry.tick_count
    for relative, ticks in progress(files.items(), "copying archive files", len(files)):
        source = locate(settings.archive_root, relative)  # compaction may have replaced it since the index copy
        _copy(source, partial / settings.archive_root.relative_to(settings.data_root) / relative, report,
              missing_ok=False)
        report.ticks += ticks
    failpoint("backup.before_rename")
    (partial / BACKUP_MARK).unlink()
    for folder in sorted({p.parent for p in partial.rglob("*")} | {partial}, key=lambda p: -len(p.parts)):
        fsync_dir(folder)
    if destination.exists():
        destination.rmdir()
    os.replace(partial, destination)
    fsync_dir(destination.parent)
    return report


def _copy(source: Path, target: Path, report: Report, *, missing_ok: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError:
        if missing_ok:
            return  # a segment archived meanwhile: the index copied after this has its hour
        report.problems.append(f"{source} is named by the index but missing; run `ibstream verify`")
        return
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())
    report.files += 1


@dataclass
class StreamStatus:
    """One stream as ``ibstream status`` shows it (times in µs; None where there is none)."""

    key: StreamKey
    last_us: int | None
    ticks: int
    buffered_ticks: int
    recording: bool  # its coverage has an open 'recorded' interval
    archived_until_us: int | None
    expired_until_us: int | None
    ticks_days: int | None
    gaps_today: list[tuple[int, int | None, str]]  # (start, end or None: still open, reason) since 00:00 UTC


@dataclass
class StoreStatus:
    streams: list[StreamStatus]
    buffer_bytes: int
    archive_bytes: int
    free_bytes: int
    publication: tuple[int, int, int] | None = None  # with archive_url: (seq, published_us, files not uploaded)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def status(settings: StorageSettings, now: int | None = None) -> StoreStatus:
    """What is stored and how recording goes, from a read-only look at the store (the recorder may run)."""
    require_store(settings)
    now = now_us() if now is None else now
    midnight = now - now % (24 * US_PER_HOUR)
    with Store(settings, read_only=True) as store:
        streams = []
        for info in store.streams():
            key = StreamKey(info.contract_id, info.tick_type)
            coverage = store.index.coverage(key.contract_id, key.tick_type.value, midnight, now + 1)
            streams.append(StreamStatus(
                key, None if info.last is None else to_us(info.last), info.tick_count, info.buffered_ticks,
                any(c.is_open and c.status == "recorded" for c in coverage),
                store.index.archived_until_of(key.contract_id, key.tick_type.value),
                store.index.expired_until(key.contract_id, key.tick_type.value),
                settings.ticks_days(key.contract_id, key.tick_type.value),
                [(max(c.start_us, midnight), c.end_us, c.reason) for c in coverage if c.status not in COVERED]))
        last = store.index.last_publication() if settings.archive_url else None
        publication = None if last is None else (
            last[0], last[3], len(store.index.all_archive_paths() - set(store.index.published_files())))
    return StoreStatus(streams, _tree_bytes(settings.buffer_root), _tree_bytes(settings.archive_root),
                       shutil.disk_usage(settings.data_root).free, publication)
