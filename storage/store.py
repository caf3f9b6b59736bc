"""The store: one entry object over segments, archive, index and planner."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
from apscheduler.schedulers.background import BackgroundScheduler

from ibstream.core.continuous import Continuous
from ibstream.core.errors import InvalidConfigError, NotFoundError, ServerUnavailableError, StorageError
from ibstream.core.times import US_PER_HOUR, duration_us, from_us, iso, now_us, to_us
from ibstream.storage import backfill as backfilling
from ibstream.storage.archive import Archiver
from ibstream.storage.bar_query import read_bars
from ibstream.storage.cache import ResultCache
from ibstream.storage.compaction import CompactReport, compact
from ibstream.storage.config import StorageSettings
from ibstream.storage.index import ArchiveEntry, ContractDetails, CoverageInterval, DailyStatistics, Index, RollPiece
from ibstream.storage.object_store import Publisher, PublishReport, Replica, check_replica_root, parse_horizons
from ibstream.storage.planner import Plan, Planner
from ibstream.storage.retention import PruneReport, prune, refuse_expired
from ibstream.storage.schemas import COVERAGE_SCHEMA, TickType, records_table
from ibstream.storage.segments import (
    SegmentWriter,
    StreamKey,
    list_streams,
)
from ibstream.storage.sessions import ContractSessions, Session, no_calendar_error

log = logging.getLogger(__name__)

# Sessions per contract details (new details from the recorder make a new entry): keeps the
# per-date hours computed across queries.
_sessions_of = functools.lru_cache(maxsize=256)(ContractSessions.from_details)


@dataclass(frozen=True)
class StreamInfo:
    """What is stored for one contract and tick type."""

    contract_id: int
    tick_type: TickType
    first: datetime | None
    last: datetime | None
    tick_count: int
    archived_ticks: int
    buffered_ticks: int


class Store:
    """Tick storage rooted at ``settings.data_root``.

    A writable store (the recorder's) recovers from crashes when opened, appends acknowledged
    ticks and archives closed hours; a read-only store serves queries over the same folder.
    """

    def __init__(self, settings: StorageSettings | None = None, *, read_only: bool = False):
        self.settings = settings or StorageSettings()
        self.read_only = read_only
        self._lock_file = None if read_only else lock_data_root(self.settings.data_root)
        if self.settings.replica:
            if not read_only:
                raise InvalidConfigError("a read server (replica) only reads: open its store read_only")
            check_replica_root(self.settings.data_root)
        self.index = Index(self.settings.index_path, read_only=read_only)
        self.writer: SegmentWriter | None = None
        self.archiver: Archiver | None = None
        self.publisher: Publisher | None = None  # with archive_url: publishes sealed hours and the index
        self.replica: Replica | None = None  # a read server's copy of the published index and files
        self._scheduler: BackgroundScheduler | None = None
        self.warmed = threading.Event()  # set once :meth:`warm` has run
        self._warming: threading.Thread | None = None
        self._closing = threading.Event()
        self._rewriting = threading.Lock()  # retention and compaction rewrite the archive one at a time
        if not read_only:
            self.writer = SegmentWriter(self.settings, on_damage=self.index.record_damage)
            self.archiver = Archiver(self.settings, self.index, self.writer)
            self.archiver.recover()
            for (cid, tt), until in self.index.archived_until().items():  # after recovery: adopted hours too
                self.writer.seal(StreamKey(cid, TickType(tt)), until)
        beside_a_writer = read_only and not self.settings.replica and not self.index.immutable  # its writer may rewrite
        self.cache = ResultCache(self.settings.cache_max_bytes, self.settings.cache_ttl.total_seconds(),
                                 rewrites=self.index.rewrites if beside_a_writer else None)
        if self.settings.archive_url is not None and not read_only:
            self.publisher = Publisher(self.settings, self.index)
        if self.settings.replica:
            self.replica = Replica(self.settings, self.index, on_refresh=self._refreshed)
            self._start_refreshing()
        self.planner = Planner(self.index, self.settings.buffer_root, self.settings.archive_root, self.writer,
                               self.refuse_expired, fetch=None if self.replica is None else self.replica.fetch)

    # -- writing -------------------------------------------------------------------------------

    def append(self, contract_id: int, tick_type: TickType | str, data: pa.RecordBatch | pa.Table) -> int:
        """Durably append ticks; returns the number acknowledged. See :class:`SegmentWriter`."""
        if self.writer is None:
            raise RuntimeError("this store was opened read_only; open it writable to append")
        return self.writer.append(contract_id, tick_type, data)

    def archive(self, now: datetime | None = None) -> list[ArchiveEntry]:
        """Archive every closed hour now (the background job does this on a schedule)."""
        if self.archiver is None:
            raise RuntimeError("this store was opened read_only; only the recording process archives")
        return self.archiver.run_once(None if now is None else to_us(now, name="now"))

    def start_background(self) -> None:
        """Run the store's jobs on background threads (apscheduler), at a lower CPU priority than
        ingest: the archiver every ``archive_check_interval``, compaction every
        ``compact_check_interval``, retention every ``retention_check_interval`` (when rules are
        set) and the scrub every ``scrub_interval``; each logs what it did."""
        if self.archiver is None or self._scheduler is not None:
            return
        self._scheduler = BackgroundScheduler(daemon=True)
        jobs: list[tuple[str, Callable[..., object], timedelta]] = [
            ("archiver", self.archiver.run_once, self.settings.archive_check_interval),
            ("compaction", self.compact, self.settings.compact_check_interval),
            ("retention", self.prune, self.settings.retention_check_interval if self.settings.retention
             else timedelta(0)),
            ("scrub", self.scrub, self.settings.scrub_interval),
            ("publication", self.publish, self.settings.publish_interval if self.publisher else timedelta(0))]
        for name, job, every in jobs:
            if every.total_seconds() > 0:
                self._scheduler.add_job(niced(_reported(name, job)), "interval", seconds=every.total_seconds(), id=name,
                                        max_instances=1, coalesce=True)
        self._scheduler.start()

    def publish(self, now: datetime | None = None) -> PublishReport:
        """Publish newly archived hours and the index to ``archive_url`` now (the background job does this
        every ``publish_interval``; see :mod:`storage.object_store`)."""
        if self.publisher is None:
            raise InvalidConfigError("this store has no archive_url to publish to (or was opened read_only); set "
                                     "IBSTREAM_ARCHIVE_URL, e.g. s3://bucket/ibstream")
        with self._rewriting:  # no compaction or retention rewrites a file while it is uploaded
            return self.publisher.run_once(None if now is None else to_us(now, name="now"))

    def _start_refreshing(self) -> None:
        """A read server: install the published index now (or serve the copy it has), then look for newer
        ones every ``replica_refresh_interval``."""
        assert self.replica is not None
        try:
            self.replica.refresh()
        except (ServerUnavailableError, StorageError) as exc:
            if self.replica.seq is None:
                self.index.close()
                raise ServerUnavailableError(f"a read server needs the published index: {exc}") from None
            log.warning("serving the index %d this read server already has: %s", self.replica.seq, exc)
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(_reported("index refresh", self.replica.refresh), "interval",
                                seconds=self.settings.replica_refresh_interval.total_seconds(), id="refresh",
                                max_instances=1, coalesce=True)
        self._scheduler.start()

    def _refreshed(self) -> None:
        self.cache.clear()  # results computed over the previous index

    def prune(self, now: datetime | None = None, *, apply: bool = True) -> PruneReport:
        """Expire raw ticks past their retention (``settings.retention``) and delete the files of hours
        expired ``retention_grace`` ago; ``apply=False`` only reports (see :mod:`storage.retention`)."""
        if apply and self.archiver is None:
            raise StorageError("this store was opened read_only; retention runs in the recording process, or "
                               "`ibstream prune --apply` with the recorder stopped")
        with self._rewriting:
            return prune(self.settings, self.index, None if now is None else to_us(now, name="now"), apply=apply,
                         on_expired=self.cache.clear)

    def compact(self, now: datetime | None = None, *, apply: bool = True, progress=None) -> CompactReport:
        """Merge closed UTC days of hourly archive files into one file per stream and day, and delete
        the files it replaced ``retention_grace`` ago; ``apply=False`` only reports (see
        :mod:`storage.compaction`)."""
        if apply and self.archiver is None:
            raise StorageError("this store was opened read_only; compaction runs in the recording process, or "
                               "`ibstream compact --apply` with the recorder stopped")
        with self._rewriting:
            return compact(self.settings, self.index, self.writer, None if now is None else to_us(now, name="now"),
                           apply=apply, on_rewritten=self.cache.clear, **({"progress": progress} if progress else {}))

    def backfill_candidates(self, now_us: int | None = None) -> list[CoverageInterval]:
        """Closed coverage gaps (and partly backfilled ones, to retry) whose every hour can be written now:
        archived, or without ticks and older than the buffer; most recent first (see :mod:`storage.backfill`)."""
        return backfilling.candidates(self, now_us)

    def backfill(self, contract_id: int, tick_type: TickType | str, gap_start_us: int, gap_end_us: int,
                 historical: pa.Table, *, status: str, reason: str = "") -> backfilling.BackfillResult:
        """Put IB's historical ticks for the coverage gap [gap_start_us, gap_end_us) into the archive, less
        those the live ticks at its edges hold, and mark the gap ``status`` (see :mod:`storage.backfill`)."""
        with self._rewriting:  # one at a time with compaction, retention and publication
            return backfilling.backfill(self, contract_id, str(tick_type), gap_start_us, gap_end_us, historical,
                                        status=status, reason=reason)

    def gap_seconds(self, contract_id: int, tick_type: TickType | str, gap_start_us: int, gap_end_us: int
                    ) -> tuple[int, int]:
        """The first and last IB second (µs) whose historical ticks :meth:`backfill` takes for a gap: up to
        the first live tick's after it (see :mod:`storage.backfill`)."""
        return backfilling.seconds_of_gap(self, contract_id, str(tick_type), gap_start_us, gap_end_us)

    def provenance(self, contract_id: int, tick_type: TickType | str, table: pa.Table) -> pa.Table:
        """``table`` with a ``source`` column: ``live``, ``backfill`` or ``fallback``, from coverage."""
        return backfilling.provenance(self, contract_id, str(tick_type), table)

    def refuse_expired(self, key: StreamKey, start_us: int, end_us: int) -> None:
        """Raise :class:`~ibstream.core.errors.ExpiredDataError` if raw ticks of the range expired."""
        refuse_expired(self.index, self.settings, key, start_us, end_us)

    def check_archived(self, entry: ArchiveEntry) -> str | None:
        """Check one published hour; a file that fails is quarantined and reported (see :meth:`scrub`)."""
        if self.archiver is None:
            raise RuntimeError("this store was opened read_only; only the recording process quarantines")
        problem = self.archiver.check(entry)
        if problem is not None:
            self.cache.clear()
        return problem

    def scrub(self, count: int | None = None) -> list[str]:
        """Check the next ``count`` (``scrub_files``) archived hours in turn, so damage is found and
        quarantined between runs of ``ibstream verify``; the background job runs it every
        ``scrub_interval``. Returns what failed."""
        if self.archiver is None:
            raise RuntimeError("this store was opened read_only; only the recording process scrubs")
        problems = self.archiver.scrub(count or self.settings.scrub_files)
        if problems:
            self.cache.clear()
        return problems

    # -- reading -------------------------------------------------------------------------------

    def plan(self, contract_id: int, tick_type: TickType | str, start_us: int, end_us: int) -> Plan:
        key = StreamKey(int(contract_id), TickType.parse(str(tick_type)))
        return self.planner.plan(key, start_us, end_us, self.settings.batch_rows)

    def read(self, contract_id: int, tick_type: TickType | str, start: datetime, end: datetime) -> pa.Table:
        """All ticks of a stream with ``start <= ts < end`` (tz-aware datetimes)."""
        return self.plan(contract_id, tick_type, to_us(start, name="start"), to_us(end, name="end")).read_all()

    def is_closed(self, contract_id: int, tick_type: TickType | str, end_us: int) -> bool:
        """Whether nothing can change before ``end_us`` any more: every hour up to it is archived
        (the writer refuses ticks for archived hours), so results over it may be cached."""
        until = self.index.archived_until_of(int(contract_id), TickType.parse(str(tick_type)).value)
        return until is not None and end_us <= until

    def ticks(self, contract_id: int, tick_type: TickType | str, start_us: int, end_us: int, *,
              check: Callable[[Plan], object] | None = None) -> pa.Table | Plan:
        """The ticks of a range: a cached table when the range is closed (see :meth:`is_closed`),
        else the plan to stream them from (never stale). ``check`` sees the plan before anything is
        read (the server's row limit); a cache hit was checked when it was computed."""
        key = ("ticks", int(contract_id), TickType.parse(str(tick_type)).value, start_us, end_us)
        if (cached := self.cache.get(key)) is not None:  # kept only if closed, and closed stays closed until a clear
            self.refuse_expired(StreamKey(int(contract_id), TickType.parse(str(tick_type))), start_us, end_us)
            return cached  # no planning on a hit
        plan = self.plan(contract_id, tick_type, start_us, end_us)
        if check is not None:
            check(plan)
        cacheable = plan.estimated_bytes() <= self.cache.max_bytes // 4  # else stream it: memory stays bounded
        closed = cacheable and self.is_closed(contract_id, tick_type, end_us)
        return self.cache.get_or_compute(key, plan.read_all) if closed else plan

    # -- scaling out (storage/object_store.py) ---------------------------------------------------

    @property
    def published_seq(self) -> int | None:
        """The sequence number of the newest index published to ``archive_url`` (by this store's recorder,
        or the one this read server has); None when nothing is published."""
        if self.replica is not None:
            return self.replica.seq
        last = self.index.last_publication() if self.settings.archive_url else None
        return None if last is None else last[0]

    def shardable_until(self, contract_id: int, tick_type: TickType | str) -> int | None:
        """Up to when (µs, exclusive) other servers can serve a stream exactly: with ``archive_url`` (on the
        recording host), what the newest published index holds; else (a read server, or servers sharing
        this folder) what is archived. None: nothing."""
        tt = TickType.parse(str(tick_type)).value
        if self.settings.archive_url and self.replica is None:
            last = self.index.last_publication()
            return None if last is None else parse_horizons(last[2]).get((int(contract_id), tt))
        return self.index.archived_until_of(int(contract_id), tt)

    def require_index(self, seq: int | None) -> None:
        """Make sure this server has at least index ``seq`` (a coordinator's ticket names the one it planned
        with): a read server behind fetches the newer index now, and refuses with
        :class:`~ibstream.core.errors.ServerUnavailableError` (try another location) if it cannot."""
        if seq is not None and self.replica is not None:
            self.replica.require(seq)

    def hour_bars(self, contract_id: int, tick_type: str, start_us: int, end_us: int) -> dict[int, bytes]:
        """The 1-minute pre-aggregates of archived (and expired) hours in [start_us, end_us), by hour start:
        from the index, or on a read server also from the object store."""
        if self.replica is not None:
            return self.replica.hour_bars(contract_id, tick_type, start_us, end_us)
        return self.index.hour_bars(contract_id, tick_type, start_us, end_us)

    def bars(self, contract_id: int, tick_type: TickType | str, start_us: int, end_us: int, resolution: str, *,
             fill: bool = False, sessions: list[Session] | None = None) -> pa.Table:
        """Bars of a stream over ``[start_us, end_us)`` (see :mod:`storage.bars`); daily bars need the
        trading ``sessions`` to build. Cached when the range is closed."""
        key = StreamKey(int(contract_id), TickType.parse(str(tick_type)))

        def compute() -> pa.Table:
            return read_bars(self, key, start_us, end_us, resolution, fill=fill, sessions=sessions)

        days = tuple((s.open_us, s.close_us) for s in sessions or ())
        cache_key = ("bars", key, start_us, end_us, resolution, fill, days)
        if (cached := self.cache.get(cache_key)) is not None:  # kept only if closed (see ticks)
            return cached
        if not self.is_closed(contract_id, tick_type, end_us):
            return compute()
        return self.cache.get_or_compute(cache_key, compute)

    def warm_in_background(self) -> None:
        """Start :meth:`warm` on a thread (once); :meth:`close` stops and waits for it."""
        if self._warming is None and not self._closing.is_set():
            self._warming = threading.Thread(target=self.warm, name="warm-up", daemon=True)
            self._warming.start()

    def warm(self) -> None:
        """What the first queries after a start need, done ahead on a background thread (the server
        starts it): the trading sessions of every contract, then per stream the last ``warm_recent``
        of ticks (at least the current regular session) read through once, so that the archive files'
        footers are parsed, the closed segments decoded and their pages in memory. Logs what it did."""
        started = time.perf_counter()
        self.warm_sessions()
        span = duration_us(self.settings.warm_recent)
        rows = streams = 0
        if span > 0:
            try:
                for info in self.streams():
                    if info.last is None or self._closing.is_set():
                        continue
                    end = to_us(info.last) + 1
                    start = end - span
                    try:
                        start = min(start, self.sessions(info.contract_id).current("regular", end).open_us)
                    except Exception:  # no details or no session: the recent span alone
                        pass
                    start = max(start, end - 24 * US_PER_HOUR)
                    for batch in self.plan(info.contract_id, info.tick_type, start, end).batches():
                        rows += batch.num_rows
                        if self._closing.is_set():
                            break
                    streams += 1
            except Exception as exc:  # damaged files, expired ranges...: the queries that meet them say so
                log.warning("warming the recent ticks stopped: %s", exc)
        self.warmed.set()
        log.info("warmed up in %.1f s: trading sessions of %d contracts, the recent ticks of %d streams (%s ticks)",
                 time.perf_counter() - started, len(self.contracts()), streams, f"{rows:,}")

    def warm_sessions(self) -> None:
        """Build the sessions of every contract with details (loads their exchange calendars, which
        takes a few hundred ms once per process), so the first session query is fast."""
        try:
            for details in self.contracts():
                _sessions_of(details)
        except Exception as exc:  # a bad hours string, say: the query that needs it will say so
            log.warning("could not prepare trading sessions ahead of queries: %s", exc)

    def sessions(self, contract_id: int) -> ContractSessions:
        """The trading sessions of a contract, from the details the recorder stored for it."""
        details = self.index.contract(int(contract_id))
        if details is None:
            raise no_calendar_error(int(contract_id))
        return _sessions_of(details)

    def streams(self) -> list[StreamInfo]:
        """Every stored stream with its first/last tick time and counts."""
        summary = self.index.archive_summary()
        keys = set(list_streams(self.settings.buffer_root))
        keys |= {StreamKey(cid, TickType(tt)) for cid, tt in summary}
        infos = []
        for key in sorted(keys):
            first, last, archived, _ = summary.get((key.contract_id, key.tick_type.value), (None, None, 0, 0))
            start = (last + 1) if last is not None else (self.index.expired_until(key.contract_id, key.tick_type.value)
                                                         or 0)
            plan = self.plan(key.contract_id, key.tick_type, start, 2**62)
            buffered = plan.read_all().column("ts").cast(pa.int64())
            if len(buffered):
                first = buffered[0].as_py() if first is None else first
                last = buffered[-1].as_py()
            infos.append(StreamInfo(
                key.contract_id, key.tick_type,
                None if first is None else from_us(first), None if last is None else from_us(last),
                archived + len(buffered), archived, len(buffered),
            ))
        return infos

    def contract_ids(self) -> set[int]:
        return {k.contract_id for k in list_streams(self.settings.buffer_root)} | self.index.contract_ids()

    def stores(self, contract_id: int) -> bool:
        """Whether ``contract_id`` has ticks stored: in ``contract_ids()``, looked up for one contract
        (an index seek and one folder, however many hours the archive holds)."""
        return self.index.archives_contract(contract_id) or bool(list_streams(self.settings.buffer_root, contract_id))

    def known_contract_ids(self) -> set[int]:
        """Contracts with ticks, contract details or coverage rows (say, one IB refused)."""
        return self.contract_ids() | self.index.contract_ids_with_details_or_coverage()

    def statistics(self, contract_id: int, tick_type: str | None = None) -> list[DailyStatistics]:
        return self.index.statistics(contract_id, tick_type)

    def contracts(self) -> list[ContractDetails]:
        """Contracts whose details the recorder received from IB."""
        return self.index.contracts()

    def record_roll(self, root: str, contract_id: int, active_from_us: int) -> None:
        """The recorder made (or will make) ``contract_id`` the front contract of ``root`` from ``active_from_us``
        until the next roll; recording the same ``active_from_us`` again replaces it."""
        self.index.record_roll(root, contract_id, active_from_us, now_us())

    def rolls(self, root: str) -> list[RollPiece]:
        """The front contract of ``root`` over time (the recorded roll schedule), oldest first."""
        return self.index.rolls(root)

    def continuous_pieces(self, continuous: Continuous, start_us: int, end_us: int) -> list[tuple[int, int, int]]:
        """``(contract_id, start_us, end_us)`` that make up ``continuous`` (e.g. ``MNQ.c.0``) over the range."""
        fronts = [(piece.start_us, piece.contract_id) for piece in self.index.rolls(continuous.root)]
        if not fronts:
            roots = ", ".join(self.index.roll_roots()) or "none yet"
            raise NotFoundError(f"no roll schedule for {continuous.root!r} (roots with one: {roots}); the recorder "
                                "records one for a future configured by symbol without an expiry")
        pieces = continuous.pieces(fronts, start_us, end_us)
        if not pieces:
            raise NotFoundError(f"{continuous} has no contract over [{iso(start_us)}, {iso(end_us)}): the roll "
                                f"schedule of {continuous.root} names {len(fronts)} expiries; rank {continuous.rank} "
                                "is past the last one known")
        return pieces

    def coverage(self, contract_id: int, tick_type: TickType | str, start: datetime, end: datetime) -> pa.Table:
        """When a stream was recorded and when not (and why) over [start, end): one row per interval.

        ``end`` is null for a gap still going on; for the open 'recorded' row it is the last time
        the recorder confirmed every received tick acknowledged. Rows with status ``damaged``
        bound ticks that damaged bytes destroyed (or may have); their ``reason`` names the file,
        and the bytes are in ``{data_root}/quarantine``. They may overlap 'recorded' rows.
        """
        tick_type = TickType.parse(str(tick_type)).value
        start_us, end_us = to_us(start, name="start"), to_us(end, name="end")
        rows = self.index.coverage(contract_id, tick_type, start_us, end_us)
        rows += [CoverageInterval(d.contract_id, d.tick_type, "damaged",
                                  f"{d.reason}; in {d.file}" + (f", kept in {d.quarantined}" if d.quarantined else ""),
                                  d.start_us, d.end_us, False)
                 for d in self.index.damage(contract_id, tick_type, start_us, end_us - 1)]
        rows.sort(key=lambda r: r.start_us)
        return records_table(rows, COVERAGE_SCHEMA, {"start": "start_us", "end": "end_us", "open": "is_open",
                                                     "backfilled_at": "backfilled_at_us"})

    def close(self) -> None:
        self._closing.set()
        if self._warming is not None:
            self._warming.join()  # it reads the index and files closed below
            self._warming = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self.writer is not None:
            self.writer.close()
        self.index.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BACKGROUND_NICENESS = 10  # added to a job thread's nice value: ingest and queries come first


def niced(job: Callable[..., object]) -> Callable[[], object]:
    """``job``, run at a lower CPU priority: on Linux a thread has its own nice value (elsewhere this
    does nothing). Set once per pool thread."""
    def run() -> object:
        if not getattr(_job_thread, "niced", False):
            _job_thread.niced = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(
                    19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + BACKGROUND_NICENESS))
            except (AttributeError, OSError):
                pass
        return job()

    return functools.wraps(job)(run)


_job_thread = threading.local()


def _reported(name: str, job: Callable[..., object]) -> Callable[[], object]:
    """``job`` as a scheduled run: a storage failure (a full disk, say) is one log line when it starts
    and one when it ends, not a traceback every run; the next run tries again."""
    failing: list[str] = []

    def run() -> object:
        try:
            result = job()
        except (OSError, sqlite3.OperationalError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if not failing:
                log.error("%s stopped: %s; nothing was changed, it runs again on schedule", name, problem)
            failing[:] = [problem]
            return None
        if failing:
            log.warning("%s works again (it had stopped: %s)", name, failing[0])
            failing.clear()
        return result

    return run


def lock_data_root(data_root: Path):
    """One writer per data root: an exclusive flock, released by the OS if the process dies."""
    data_root.mkdir(parents=True, exist_ok=True)
    path = data_root / "writer.lock"
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StorageError(
            f"{data_root} is already open for writing by another process (pid {holder}); "
            "stop that recorder first, or open this store with read_only=True to query it") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock
