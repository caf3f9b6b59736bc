"""Metadata index in SQLite (WAL): archived hours, daily statistics, contracts and coverage.

Times are INTEGER microseconds since the epoch, UTC. ``tick_archives`` is the publication
point of the archive: a Parquet file answers queries only once its row is committed here,
and the buffer segments of that hour stop answering at the same instant.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ibstream.core.errors import CorruptFileError, StorageError
from ibstream.storage.failpoints import io_faults
from ibstream.storage.quarantine import Damage

log = logging.getLogger(__name__)

COVERAGE_DDL = """
CREATE TABLE IF NOT EXISTS coverage (
    id INTEGER PRIMARY KEY,
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('recorded', 'gap', 'unknown', 'backfilled', 'partly_backfilled',
                                           'unfillable')),
    reason TEXT NOT NULL,
    start_us INTEGER NOT NULL,
    end_us INTEGER,
    is_open INTEGER NOT NULL,
    backfilled_ticks INTEGER,             -- a gap backfilled (storage.backfill): the ticks it added
    backfill_note TEXT,                   -- ... what the backfill said (e.g. why it is unfillable)
    backfilled_at_us INTEGER              -- ... and when (also in its files' metadata)
);
CREATE INDEX IF NOT EXISTS idx_coverage_stream ON coverage (contract_id, tick_type, start_us);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS tick_archives (
    id INTEGER PRIMARY KEY,
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    hour_start_us INTEGER NOT NULL,       -- UTC hour the file covers, microseconds
    start_us INTEGER NOT NULL,            -- first ts in the file, microseconds UTC
    end_us INTEGER NOT NULL,              -- last ts in the file, microseconds UTC
    file_path TEXT NOT NULL,              -- relative to the archive root
    tick_count INTEGER NOT NULL,
    file_size_bytes INTEGER NOT NULL,
    arrow_size_bytes INTEGER NOT NULL,    -- in-memory (uncompressed Arrow) size
    compression_ratio REAL NOT NULL,      -- arrow_size_bytes / file_size_bytes
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    row_group_start INTEGER NOT NULL DEFAULT 0, -- a compacted day file: the hour's first row group
    row_group_count INTEGER,              -- ... and how many it has; NULL: an hourly file, all of it
    UNIQUE (contract_id, tick_type, hour_start_us)
);
CREATE INDEX IF NOT EXISTS idx_archives_contract_time
    ON tick_archives (contract_id, tick_type, start_us, end_us);

CREATE TABLE IF NOT EXISTS data_statistics (
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    date TEXT NOT NULL,                   -- UTC date, YYYY-MM-DD
    total_ticks INTEGER NOT NULL,
    unique_prices INTEGER NOT NULL,
    total_volume REAL,                    -- trades only
    vwap REAL,                            -- trades only
    high_price REAL,
    low_price REAL,
    PRIMARY KEY (contract_id, tick_type, date)
);

-- Per archived hour, its 1-minute partial bars (storage.bars) as Arrow IPC stream bytes: bars
-- from 1m up over archived hours roll these up instead of rescanning the hour's ticks.
CREATE TABLE IF NOT EXISTS hour_bars (
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    hour_start_us INTEGER NOT NULL,       -- UTC hour, microseconds (as in tick_archives)
    bars BLOB NOT NULL,
    PRIMARY KEY (contract_id, tick_type, hour_start_us)
);

CREATE TABLE IF NOT EXISTS contracts (
    contract_id INTEGER PRIMARY KEY,      -- IB conId
    symbol TEXT NOT NULL,
    sec_type TEXT NOT NULL,
    exchange TEXT NOT NULL,
    primary_exchange TEXT NOT NULL,
    currency TEXT NOT NULL,
    local_symbol TEXT NOT NULL,
    trading_class TEXT NOT NULL,
    last_trade_date TEXT NOT NULL,        -- futures/options expiry, YYYYMMDD; '' for stocks
    multiplier TEXT NOT NULL,
    min_tick REAL NOT NULL,
    long_name TEXT NOT NULL,
    time_zone TEXT NOT NULL,              -- IB's timeZoneId, e.g. US/Eastern
    trading_hours TEXT NOT NULL,          -- IB's tradingHours: YYYYMMDD:HHMM-YYYYMMDD:HHMM;... or YYYYMMDD:CLOSED
    liquid_hours TEXT NOT NULL,           -- IB's liquidHours, same format (regular session)
    updated_at_us INTEGER NOT NULL        -- when the details were received, microseconds UTC
);

-- Per stream, the intervals during which it was subscribed on a live connection with every
-- received tick acknowledged ('recorded'), and the intervals when it was not ('gap', with why).
-- The stream's current interval has is_open = 1; an open 'recorded' row's end_us is the
-- last time the recorder confirmed it (advanced about once a second), an open gap's is NULL.
""" + COVERAGE_DDL + """

-- Spans of a stream that damaged bytes destroyed (or may have): the bytes were moved to the
-- quarantine folder; the coverage action reports these as status 'damaged'.
CREATE TABLE IF NOT EXISTS damage (
    id INTEGER PRIMARY KEY,
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    start_us INTEGER NOT NULL,            -- last readable tick before the damage (or the file's edge)
    end_us INTEGER NOT NULL,              -- first readable tick after it (or the file's edge)
    file TEXT NOT NULL,                   -- where the damaged bytes were, relative to the data root
    quarantined TEXT NOT NULL,            -- where they are now, relative to the data root
    reason TEXT NOT NULL,
    detected_at_us INTEGER NOT NULL,
    damaged_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_damage_stream ON damage (contract_id, tick_type, start_us);

-- Hours whose raw ticks left the archive by retention (storage.retention): their hour_bars,
-- data_statistics and coverage stay. file_removed = 0 while the file may still exist (it is
-- deleted a grace period after the row was written, so readers that planned it read it whole).
CREATE TABLE IF NOT EXISTS expired_hours (
    contract_id INTEGER NOT NULL,
    tick_type TEXT NOT NULL,
    hour_start_us INTEGER NOT NULL,
    tick_count INTEGER NOT NULL,
    file_path TEXT NOT NULL,              -- relative to the archive root
    expired_at_us INTEGER NOT NULL,
    file_removed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (contract_id, tick_type, hour_start_us)
);

-- Hourly archive files that compaction (storage.compaction) replaced by a day file: from the index
-- swap on they answer no new plan; they are moved to {data_root}/superseded/ (where readers that
-- planned them before the swap still find them) and deleted a grace period later.
CREATE TABLE IF NOT EXISTS superseded_files (
    file_path TEXT PRIMARY KEY,           -- relative to the archive root (and to superseded/)
    replaced_by TEXT NOT NULL,            -- the day file, relative to the archive root
    superseded_at_us INTEGER NOT NULL
);

-- Publication to an object store (storage.object_store): the archive files uploaded (under a name
-- that holds their SHA-256, so an object never changes), objects no index names any more (deleted a
-- grace period later), each published index and what read servers can serve from it.
CREATE TABLE IF NOT EXISTS published_files (
    file_path TEXT PRIMARY KEY,           -- relative to the archive root
    object_key TEXT NOT NULL,             -- relative to archive_url: archive/.../data-<sha256 prefix>.parquet
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,            -- of the local file uploaded: a file rewritten since is uploaded again
    published_us INTEGER NOT NULL,
    bars_size INTEGER,                    -- its hours' 1-minute pre-aggregates, uploaded beside it as
    bars_sha256 TEXT                      -- <object_key stem>.bars.arrow (NULL: none)
);
CREATE TABLE IF NOT EXISTS unreferenced_objects (
    object_key TEXT PRIMARY KEY,
    since_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS publications (
    seq INTEGER PRIMARY KEY,              -- index/index-{seq}.sqlite.zst; index/LATEST names the newest
    published_us INTEGER NOT NULL,
    changes INTEGER NOT NULL,             -- index_changes.n it was made at: unchanged since, nothing to publish
    horizons TEXT NOT NULL                -- JSON [[contract_id, tick_type, until_us], ...]: served by read servers
);
-- Continuous futures (``MNQ.c.0``): which expiry the recorder made the front contract of ``root``
-- from when. A row holds until the next row's active_from_us; replanned future rolls replace rows.
CREATE TABLE IF NOT EXISTS rolls (
    root TEXT NOT NULL,                   -- the configured symbol, e.g. MNQ
    active_from_us INTEGER NOT NULL,
    contract_id INTEGER NOT NULL,         -- the expiry's conId (its details are in contracts)
    recorded_us INTEGER NOT NULL,
    PRIMARY KEY (root, active_from_us)
);
CREATE TABLE IF NOT EXISTS publication_target (url TEXT NOT NULL);  -- the archive_url published_files refers to
-- Counts writes to what read servers serve (hours, statistics, pre-aggregates, expiry, contracts).
CREATE TABLE IF NOT EXISTS index_changes (n INTEGER NOT NULL);
INSERT INTO index_changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM index_changes);
-- Counts writes to archived hours other than a stream's new newest hour (backfill, retention,
-- compaction, quarantine, an import into the past): results cached over closed ranges may be stale.
CREATE TABLE IF NOT EXISTS archive_rewrites (n INTEGER NOT NULL);
INSERT INTO archive_rewrites SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM archive_rewrites);
""" + "".join(f"""CREATE TRIGGER IF NOT EXISTS changed_{table}_{event.lower()} AFTER {event} ON {table}
    BEGIN UPDATE index_changes SET n = n + 1; END;
""" for table in ("tick_archives", "data_statistics", "hour_bars", "contracts", "expired_hours", "rolls")
    for event in ("INSERT", "UPDATE", "DELETE")) + "".join(f"""CREATE TRIGGER IF NOT EXISTS rewrote_{table}_{name}
    {timing} ON {table}{condition} BEGIN UPDATE archive_rewrites SET n = n + 1; END;
""" for table in ("tick_archives", "hour_bars") for name, timing, condition in (
    ("update", "AFTER UPDATE", ""),
    ("delete", "AFTER DELETE", ""),
    # before the row goes in, so that INSERT OR REPLACE still sees the row it replaces
    ("insert", "BEFORE INSERT", f" WHEN EXISTS (SELECT 1 FROM {table} WHERE contract_id = NEW.contract_id AND "
                                "tick_type = NEW.tick_type AND hour_start_us >= NEW.hour_start_us)"),
))

SCHEMA_VERSION = 5  # PRAGMA user_version; 1: before 'unknown' coverage and the damage table; 2: times not named *_us;
#                     3: before compaction (no row groups in tick_archives); 4: before backfill (coverage statuses)

_RENAMED_V3 = {  # table: {column before version 3: its name since}
    "tick_archives": {"hour_start": "hour_start_us", "start_time": "start_us", "end_time": "end_us"},
    "hour_bars": {"hour_start": "hour_start_us"},
    "contracts": {"updated_at": "updated_at_us"},
    "coverage": {"start_time": "start_us", "end_time": "end_us"},
    "damage": {"start_time": "start_us", "end_time": "end_us", "detected_at": "detected_at_us"},
}


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock up front) .. ``COMMIT``; any exception rolls back and goes on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index written by an older ibstream up to :data:`SCHEMA_VERSION`, in one transaction
    (a crash leaves the old version whole). Runs before :data:`SCHEMA`, whose indexes name the new columns."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version >= SCHEMA_VERSION or not tables:
        return
    with _transaction(conn):
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'coverage'").fetchone()
        if sql is not None and "'unfillable'" not in sql[0]:  # widen the status CHECK (+ backfill columns): rebuild
            conn.execute("DROP INDEX IF EXISTS idx_coverage_stream")
            conn.execute("ALTER TABLE coverage RENAME TO coverage_v1")
            for statement in COVERAGE_DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO coverage (id, contract_id, tick_type, status, reason, start_us, end_us, is_open) "
                         "SELECT * FROM coverage_v1")  # by position: a version-1 table names its times *_time
            conn.execute("DROP TABLE coverage_v1")
        for table, renames in _RENAMED_V3.items():
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for old, new in renames.items():
                if old in columns:  # RENAME COLUMN carries indexes and constraints along
                    conn.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tick_archives)")}
        if "row_group_start" not in columns:  # version 4: compacted day files
            conn.execute("ALTER TABLE tick_archives ADD COLUMN row_group_start INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE tick_archives ADD COLUMN row_group_count INTEGER")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@dataclass(frozen=True)
class ArchiveEntry:
    contract_id: int
    tick_type: str
    hour_start_us: int
    start_us: int
    end_us: int
    file_path: str
    tick_count: int
    file_size_bytes: int  # an hourly file's size; in a day file, the hour's row groups' (compressed) bytes
    arrow_size_bytes: int
    row_group_start: int = 0
    row_group_count: int | None = None  # None: an hourly file (every row group); else the hour's in a day file

    @property
    def row_groups(self) -> list[int] | None:
        """The row groups of the file that hold this hour (None: all of them)."""
        return None if self.row_group_count is None else list(range(self.row_group_start,
                                                                    self.row_group_start + self.row_group_count))


@dataclass(frozen=True)
class PublishedFile:
    """An archive file uploaded to the object store (table ``published_files``)."""

    file_path: str
    object_key: str
    size_bytes: int
    sha256: str
    mtime_ns: int
    published_us: int
    bars_size: int | None = None  # the sidecar of its hours' hour_bars (storage.object_store.bars_key)
    bars_sha256: str | None = None


@dataclass(frozen=True)
class SupersededFile:
    file_path: str
    replaced_by: str
    superseded_at_us: int


@dataclass(frozen=True)
class ExpiredHour:
    contract_id: int
    tick_type: str
    hour_start_us: int
    tick_count: int
    file_path: str
    expired_at_us: int
    file_removed: bool


@dataclass(frozen=True)
class DailyStatistics:
    contract_id: int
    tick_type: str
    date: str
    total_ticks: int
    unique_prices: int
    total_volume: float | None
    vwap: float | None
    high_price: float | None
    low_price: float | None


@dataclass(frozen=True)
class ContractDetails:
    """A contract as IB describes it (``reqContractDetails``), kept for sessions and display."""

    contract_id: int
    symbol: str
    sec_type: str
    exchange: str
    primary_exchange: str
    currency: str
    local_symbol: str
    trading_class: str
    last_trade_date: str
    multiplier: str
    min_tick: float
    long_name: str
    time_zone: str
    trading_hours: str
    liquid_hours: str
    updated_at_us: int


@dataclass(frozen=True)
class RollPiece:
    """``root``'s front contract is ``contract_id`` over [start_us, end_us) (``end_us`` None: still)."""

    root: str
    contract_id: int
    start_us: int
    end_us: int | None


@dataclass(frozen=True)
class CoverageInterval:
    """One row of ``coverage``: ``end_us`` is None for a gap that is still going on. A backfilled gap
    (:mod:`storage.backfill`) keeps its reason and says how many ticks the backfill added, its note and when."""

    contract_id: int
    tick_type: str
    status: str
    reason: str
    start_us: int
    end_us: int | None
    is_open: bool
    backfilled_ticks: int | None = None
    backfill_note: str | None = None
    backfilled_at_us: int | None = None


COVERED = ("recorded", "backfilled")  # coverage statuses whose span holds every tick (a gap backfilled whole)
BACKFILLABLE = ("gap", "partly_backfilled")  # what a backfill may fill (partly: again)
BACKFILL_STATUSES = ("backfilled", "partly_backfilled", "unfillable")  # what a backfill makes of a gap


def writable_dir(path: Path) -> bool:
    """Whether files can be made in ``path`` (False on read-only media; the fault point
    ``data_root.read_only`` pretends so, where no read-only filesystem can be mounted)."""
    if io_faults.check("data_root.read_only") is not None:
        return False
    return os.access(path, os.W_OK)


MAX_IDLE_CONNECTIONS = 8  # connections kept open for the next thread; more are closed


class _Held:
    """A thread's connection, held by the thread's local storage. When the thread ends (for Flight's
    handlers: when the call returns), the connection goes back to the index's idle pool."""

    __slots__ = ("conn", "give_back")

    def __init__(self, conn: sqlite3.Connection, give_back: Callable[[sqlite3.Connection], None]):
        self.conn, self.give_back = conn, give_back

    def __del__(self) -> None:
        try:
            self.give_back(self.conn)
        except Exception:  # interpreter shutdown: nothing left to give back to
            pass


_COVERAGE_COLUMNS = ("contract_id, tick_type, status, reason, start_us, end_us, is_open, backfilled_ticks, "
                     "backfill_note, backfilled_at_us")  # CoverageInterval's fields, in order


def _coverage_row(row: tuple) -> CoverageInterval:
    cid, tick, status, reason, start, end, is_open, *backfill = row
    return CoverageInterval(cid, tick, status, reason, start, end, bool(is_open), *backfill)


_ENTRY_COLUMNS = ("contract_id, tick_type, hour_start_us, start_us, end_us, file_path, tick_count, file_size_bytes, "
                  "arrow_size_bytes, row_group_start, row_group_count")  # ArchiveEntry's fields, in order


class Index:
    """SQLite metadata index; one connection per thread, safe for concurrent readers.

    A damaged database file is refused with :class:`~ibstream.core.errors.CorruptFileError` naming
    ``ibstream reindex``, which rebuilds it from the files.
    """

    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        # on read-only media (a mounted snapshot, a DVD), SQLite can make neither the WAL's shared memory nor a
        # journal: the file is opened immutable, as it was last checkpointed (a clean stop checkpoints everything)
        self.immutable = read_only and path.exists() and not writable_dir(path.parent)
        if not self.immutable:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._open: set[sqlite3.Connection] = set()  # every connection this index opened and did not close
        self._idle: list[sqlite3.Connection] = []  # of those, the ones no thread holds (most recent last)
        self._connections_lock = threading.RLock()  # RLock: a _Held may be collected while it is held
        try:
            conn = self._connection()
            if self.immutable:
                self._check_immutable(conn)
            else:
                _migrate(conn)
                conn.executescript(SCHEMA)
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a new index
            conn.execute("SELECT COUNT(*) FROM tick_archives").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise CorruptFileError(
                f"the index {path} cannot be read ({exc}); rebuild it from the archive and buffer files with "
                f"`ibstream reindex --data-root {path.parent}` (the damaged file is kept aside)") from None

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection: an idle one from the pool, or a new one (Flight runs each call
        on a fresh Python thread state, so without the pool every call would open a connection)."""
        held = getattr(self._local, "held", None)
        if held is None:
            with self._connections_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None and self.immutable:
                conn = sqlite3.connect(f"file:{urllib.parse.quote(str(self.path))}?immutable=1", uri=True,
                                       isolation_level=None, check_same_thread=False)
                with self._connections_lock:
                    self._open.add(conn)
            if conn is None:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                with self._connections_lock:
                    self._open.add(conn)
            held = self._local.held = _Held(conn, self._give_back)
        return held.conn

    def _check_immutable(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            raise StorageError(
                f"the index {self.path} on read-only media has schema version {version}, this ibstream reads "
                f"{SCHEMA_VERSION}; open a writable copy once (e.g. `ibstream verify`) to upgrade it")
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            log.warning("%s is on read-only media with a write-ahead log that was never checkpointed (the recorder "
                        "did not stop cleanly): what only the log holds is not served", self.path)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._connections_lock:
            if conn not in self._open:
                return  # closed by close() meanwhile
            if len(self._idle) < MAX_IDLE_CONNECTIONS and not conn.in_transaction:
                self._idle.append(conn)
                return
            self._open.discard(conn)
        conn.close()

    @property
    def open_connections(self) -> int:
        """Connections open now (held by threads and idle): bounded by the threads using the index at
        once plus :data:`MAX_IDLE_CONNECTIONS`."""
        with self._connections_lock:
            return len(self._open)

    def _writable(self) -> sqlite3.Connection:
        """The connection for a write (where tests inject a full disk: point ``index.write``)."""
        if io_faults.check("index.write") is not None:
            raise sqlite3.OperationalError("database or disk is full (injected at index.write)")
        return self._connection()

    # -- archive -------------------------------------------------------------------------------

    def publish(self, entry: ArchiveEntry, statistics: DailyStatistics | None, minute_bars: bytes,
                coverage: Sequence[CoverageInterval] = ()) -> None:
        """Record an archived hour, its 1-minute partial bars, its day's statistics (None: left for the
        caller) and new closed ``coverage`` rows (an imported hour's) in one transaction."""
        with _transaction(self._writable()) as conn:
            self._put_hour_bars(conn, entry.contract_id, entry.tick_type, entry.hour_start_us, minute_bars)
            self._insert_archive(conn, entry)
            if statistics is not None:
                self._put_statistics(conn, statistics)
            conn.executemany(
                "INSERT INTO coverage (contract_id, tick_type, status, reason, start_us, end_us, is_open) "
                "VALUES (?, ?, ?, ?, ?, ?, 0)",
                [(r.contract_id, r.tick_type, r.status, r.reason, r.start_us, r.end_us) for r in coverage])

    @staticmethod
    def _insert_archive(conn: sqlite3.Connection, entry: ArchiveEntry) -> None:
        conn.execute(
            "INSERT INTO tick_archives (contract_id, tick_type, hour_start_us, start_us, end_us, "
            "file_path, tick_count, file_size_bytes, arrow_size_bytes, compression_ratio, row_group_start, "
            "row_group_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.contract_id, entry.tick_type, entry.hour_start_us, entry.start_us, entry.end_us,
                entry.file_path, entry.tick_count, entry.file_size_bytes, entry.arrow_size_bytes,
                entry.arrow_size_bytes / max(entry.file_size_bytes, 1), entry.row_group_start,
                entry.row_group_count,
            ),
        )

    def archives(self, contract_id: int, tick_type: str, start_us: int, end_us: int) -> list[ArchiveEntry]:
        """Archived hours of a stream whose hour overlaps [start_us, end_us), oldest first."""
        rows = self._connection().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM tick_archives "
            "WHERE contract_id = ? AND tick_type = ? AND hour_start_us < ? AND hour_start_us + 3600000000 > ? "
            "ORDER BY hour_start_us",
            (contract_id, tick_type, end_us, start_us),
        ).fetchall()
        return [ArchiveEntry(*row) for row in rows]

    def archives_all(self) -> list[ArchiveEntry]:
        """Every archived hour, by stream and hour."""
        rows = self._connection().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM tick_archives ORDER BY contract_id, tick_type, hour_start_us")
        return [ArchiveEntry(*row) for row in rows]

    def entries_of(self, file_path: str) -> list[ArchiveEntry]:
        """The archived hours a file answers for (a day file: several), oldest first."""
        rows = self._connection().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM tick_archives WHERE file_path = ? ORDER BY hour_start_us", (file_path,))
        return [ArchiveEntry(*row) for row in rows]

    def swap_compacted(self, old: list[ArchiveEntry], new: list[ArchiveEntry], minute_bars: dict[int, bytes],
                       at_us: int, *, supersede: bool = True) -> None:
        """In one transaction: the hours of ``old`` are answered by ``new`` (rows of a day file) from now
        on, with the 1-minute bars computed from the new file; the files of ``old`` become superseded."""
        with _transaction(self._writable()) as conn:
            for before, after in zip(old, new, strict=True):
                updated = conn.execute(
                    "UPDATE tick_archives SET file_path = ?, file_size_bytes = ?, row_group_start = ?, "
                    "row_group_count = ?, compression_ratio = ? WHERE contract_id = ? AND tick_type = ? "
                    "AND hour_start_us = ? AND file_path = ?",
                    (after.file_path, after.file_size_bytes, after.row_group_start, after.row_group_count,
                     after.arrow_size_bytes / max(after.file_size_bytes, 1), before.contract_id, before.tick_type,
                     before.hour_start_us, before.file_path)).rowcount
                if updated != 1:
                    raise StorageError(f"compaction: hour {before.hour_start_us} of {before.contract_id} "
                                       f"{before.tick_type} changed in the index meanwhile; nothing was swapped")
                self._put_hour_bars(conn, after.contract_id, after.tick_type, after.hour_start_us,
                                    minute_bars[after.hour_start_us])
            replaced_by = new[0].file_path
            for path in sorted({e.file_path for e in old} - {replaced_by}) if supersede else ():
                conn.execute("INSERT OR REPLACE INTO superseded_files VALUES (?, ?, ?)", (path, replaced_by, at_us))

    def split_days(self, before_us: int) -> list[tuple[int, str, int]]:
        """(contract_id, tick_type, day start µs) of UTC days ending by ``before_us`` whose archived
        hours live in more than one file: what compaction would merge."""
        rows = self._connection().execute(
            "SELECT contract_id, tick_type, hour_start_us - hour_start_us % 86400000000 AS day FROM tick_archives "
            "WHERE hour_start_us < ? - 82800000000 GROUP BY contract_id, tick_type, day "
            "HAVING COUNT(DISTINCT file_path) > 1 ORDER BY contract_id, tick_type, day", (before_us,))
        return [(cid, tt, day) for cid, tt, day in rows if day + 86_400_000_000 <= before_us]

    def superseded(self, before_us: int | None = None) -> list[SupersededFile]:
        """Files compaction replaced (superseded before ``before_us``), oldest first."""
        sql, args = "SELECT file_path, replaced_by, superseded_at_us FROM superseded_files", tuple[int, ...]()
        if before_us is not None:
            sql, args = sql + " WHERE superseded_at_us <= ?", (before_us,)
        return [SupersededFile(*row) for row in self._connection().execute(sql + " ORDER BY superseded_at_us", args)]

    def add_superseded(self, files: list[SupersededFile]) -> None:
        self._writable().executemany("INSERT OR REPLACE INTO superseded_files VALUES (?, ?, ?)",
                                     [(f.file_path, f.replaced_by, f.superseded_at_us) for f in files])

    def forget_superseded(self, paths: list[str]) -> None:
        self._writable().executemany("DELETE FROM superseded_files WHERE file_path = ?", [(p,) for p in paths])

    def hour_bars(self, contract_id: int, tick_type: str, start_us: int, end_us: int) -> dict[int, bytes]:
        """The 1-minute partial bars of archived hours starting in [start_us, end_us), by hour."""
        rows = self._connection().execute(
            "SELECT hour_start_us, bars FROM hour_bars WHERE contract_id = ? AND tick_type = ? "
            "AND hour_start_us >= ? AND hour_start_us < ?", (contract_id, tick_type, start_us, end_us))
        return dict(rows)

    def put_hour_bars(self, contract_id: int, tick_type: str, hour_start_us: int, minute_bars: bytes) -> None:
        """Keep the partial bars of an hour archived before they existed (computed on first use)."""
        self._put_hour_bars(self._writable(), contract_id, tick_type, hour_start_us, minute_bars)

    @staticmethod
    def _put_hour_bars(conn: sqlite3.Connection, contract_id: int, tick_type: str, hour_start_us: int,
                       minute_bars: bytes) -> None:
        conn.execute("INSERT OR REPLACE INTO hour_bars VALUES (?, ?, ?, ?)",
                     (contract_id, tick_type, hour_start_us, minute_bars))

    def all_archive_paths(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT file_path FROM tick_archives")}

    def archived_until(self) -> dict[tuple[int, str], int]:
        """Per stream, the end of its newest archived hour (microseconds)."""
        rows = self._connection().execute(
            "SELECT contract_id, tick_type, MAX(hour_start_us) + 3600000000 FROM tick_archives "
            "GROUP BY contract_id, tick_type"
        )
        return {(cid, tt): until for cid, tt, until in rows}

    def archived_until_of(self, contract_id: int, tick_type: str) -> int | None:
        """The end of a stream's newest archived hour (microseconds), None if none is archived."""
        row = self._connection().execute(
            "SELECT MAX(hour_start_us) + 3600000000 FROM tick_archives WHERE contract_id = ? AND tick_type = ?",
            (contract_id, tick_type)).fetchone()
        return row[0]

    def archive_summary(self) -> dict[tuple[int, str], tuple[int, int, int, int]]:
        """Per stream: (first ts, last ts, ticks, bytes on disk) over the archive."""
        rows = self._connection().execute(
            "SELECT contract_id, tick_type, MIN(start_us), MAX(end_us), SUM(tick_count), SUM(file_size_bytes) "
            "FROM tick_archives GROUP BY contract_id, tick_type"
        )
        return {(cid, tt): (first, last, count, size) for cid, tt, first, last, count, size in rows}

    def contract_ids(self) -> set[int]:
        return {row[0] for row in self._connection().execute("SELECT DISTINCT contract_id FROM tick_archives")}

    def archives_contract(self, contract_id: int) -> bool:
        """Whether any hour of ``contract_id`` is archived (one seek in idx_archives_contract_time)."""
        return self._connection().execute("SELECT 1 FROM tick_archives WHERE contract_id = ? LIMIT 1",
                                          (contract_id,)).fetchone() is not None

    # -- publication (storage.object_store) ---------------------------------------------------

    def published_files(self) -> dict[str, PublishedFile]:
        rows = self._connection().execute("SELECT * FROM published_files")
        return {row[0]: PublishedFile(*row) for row in rows}

    def published_file(self, file_path: str) -> PublishedFile | None:
        row = self._connection().execute("SELECT * FROM published_files WHERE file_path = ?", (file_path,)).fetchone()
        return None if row is None else PublishedFile(*row)

    def add_published(self, published: PublishedFile, at_us: int) -> None:
        """Record an uploaded file; the object it replaces (the file was rewritten) becomes unreferenced."""
        conn = self._writable()
        with conn:
            old = self.published_file(published.file_path)
            if old is not None and old.object_key != published.object_key:
                conn.execute("INSERT OR IGNORE INTO unreferenced_objects VALUES (?, ?)", (old.object_key, at_us))
            conn.execute("INSERT OR REPLACE INTO published_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         tuple(published.__dict__.values()))
            conn.execute("DELETE FROM unreferenced_objects WHERE object_key = ?", (published.object_key,))

    def hour_bars_of_file(self, file_path: str) -> list[tuple[int, bytes]]:
        """(hour start, 1-minute pre-aggregates) of the hours an archive file answers for."""
        return self._connection().execute(
            "SELECT b.hour_start_us, b.bars FROM tick_archives a JOIN hour_bars b USING (contract_id, tick_type, "
            "hour_start_us) WHERE a.file_path = ? ORDER BY b.hour_start_us", (file_path,)).fetchall()

    def unpublish(self, file_paths: list[str], at_us: int) -> None:
        """Files the index names no more: their objects are deleted a grace period later."""
        conn = self._writable()
        with conn:
            for path in file_paths:
                conn.execute("INSERT OR IGNORE INTO unreferenced_objects SELECT object_key, ? FROM published_files "
                             "WHERE file_path = ?", (at_us, path))
                conn.execute("DELETE FROM published_files WHERE file_path = ?", (path,))

    def unreferenced_objects(self, before_us: int) -> list[str]:
        return [row[0] for row in self._connection().execute(
            "SELECT object_key FROM unreferenced_objects WHERE since_us < ? ORDER BY object_key", (before_us,))]

    def forget_unreferenced(self, object_keys: list[str]) -> None:
        conn = self._writable()
        with conn:
            conn.executemany("DELETE FROM unreferenced_objects WHERE object_key = ?", [(k,) for k in object_keys])

    def publication_target(self) -> str | None:
        row = self._connection().execute("SELECT url FROM publication_target").fetchone()
        return None if row is None else row[0]

    def restart_publication(self, url: str) -> None:
        """Forget what was published (another archive_url, or one emptied since): everything goes up again."""
        conn = self._writable()
        with conn:
            for table in ("published_files", "unreferenced_objects", "publications", "publication_target"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT INTO publication_target VALUES (?)", (url,))

    def rewrites(self) -> int:
        """How many writes changed archived hours other than by adding a stream's newest (a counter kept by
        triggers): a store reading beside the recorder's clears its result cache when it moves."""
        return self._connection().execute("SELECT n FROM archive_rewrites").fetchone()[0]

    def changes(self) -> int:
        """How many writes read servers would see have been made to this index (a counter kept by triggers)."""
        return self._connection().execute("SELECT n FROM index_changes").fetchone()[0]

    def last_publication(self) -> tuple[int, int, str, int] | None:
        """(seq, changes, horizons JSON, published_us) of the newest published index, None before the first."""
        return self._connection().execute(
            "SELECT seq, changes, horizons, published_us FROM publications ORDER BY seq DESC LIMIT 1").fetchone()

    def record_publication(self, seq: int, at_us: int, changes: int, horizons: str) -> None:
        conn = self._writable()
        with conn:
            conn.execute("INSERT OR REPLACE INTO publications VALUES (?, ?, ?, ?)", (seq, at_us, changes, horizons))
            conn.execute("DELETE FROM publications WHERE seq < ?", (seq - 100,))

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self, contract_id: int, tick_type: str | None = None) -> list[DailyStatistics]:
        sql = "SELECT * FROM data_statistics WHERE contract_id = ?"
        args: tuple = (contract_id,)
        if tick_type is not None:
            sql += " AND tick_type = ?"
            args += (tick_type,)
        rows = self._connection().execute(sql + " ORDER BY tick_type, date", args).fetchall()
        return [DailyStatistics(*row) for row in rows]

    # -- contracts -----------------------------------------------------------------------------

    def upsert_contract(self, details: ContractDetails) -> None:
        names = ", ".join(ContractDetails.__dataclass_fields__)
        marks = ", ".join("?" * len(ContractDetails.__dataclass_fields__))
        self._writable().execute(f"INSERT OR REPLACE INTO contracts ({names}) VALUES ({marks})",
                                   tuple(details.__dict__.values()))

    def contract(self, contract_id: int) -> ContractDetails | None:
        row = self._connection().execute("SELECT * FROM contracts WHERE contract_id = ?", (contract_id,)).fetchone()
        return None if row is None else ContractDetails(*row)

    # -- continuous futures --------------------------------------------------------------------

    def record_roll(self, root: str, contract_id: int, active_from_us: int, at_us: int) -> None:
        self._writable().execute("INSERT OR REPLACE INTO rolls VALUES (?, ?, ?, ?)",
                                   (root, active_from_us, contract_id, at_us))

    def rolls(self, root: str) -> list[RollPiece]:
        """The front contract of ``root`` over time, oldest first: each piece ends where the next begins."""
        rows = self._connection().execute(
            "SELECT active_from_us, contract_id FROM rolls WHERE root = ? ORDER BY active_from_us", (root,)).fetchall()
        return [RollPiece(root, contract_id, start, rows[i + 1][0] if i + 1 < len(rows) else None)
                for i, (start, contract_id) in enumerate(rows)]

    def roll_roots(self) -> list[str]:
        return [row[0] for row in self._connection().execute("SELECT DISTINCT root FROM rolls ORDER BY root")]

    def contract_ids_with_details_or_coverage(self) -> set[int]:
        rows = self._connection().execute(
            "SELECT contract_id FROM contracts UNION SELECT DISTINCT contract_id FROM coverage")
        return {row[0] for row in rows}

    def contracts(self) -> list[ContractDetails]:
        rows = self._connection().execute("SELECT * FROM contracts ORDER BY contract_id").fetchall()
        return [ContractDetails(*row) for row in rows]

    # -- coverage ------------------------------------------------------------------------------

    def coverage_transition(self, contract_id: int, tick_type: str, at_us: int, status: str, reason: str) -> None:
        """Close the stream's open interval at ``at_us`` and open a new one (no-op if unchanged)."""
        with _transaction(self._writable()) as conn:
            current = conn.execute(
                "SELECT id, status, reason, start_us FROM coverage "
                "WHERE contract_id = ? AND tick_type = ? AND is_open = 1", (contract_id, tick_type)).fetchone()
            if current is not None and (current[1], current[2]) == (status, reason):
                return
            if current is not None:
                at_us = max(at_us, current[3])
                conn.execute("UPDATE coverage SET end_us = ?, is_open = 0 WHERE id = ?", (at_us, current[0]))
            conn.execute(
                "INSERT INTO coverage (contract_id, tick_type, status, reason, start_us, end_us, is_open) "
                "VALUES (?, ?, ?, ?, ?, ?, 1)",
                (contract_id, tick_type, status, reason, at_us, at_us if status == "recorded" else None))

    def add_coverage(self, rows: list[CoverageInterval]) -> None:
        """Add closed coverage rows (rebuilding an index from archive files, an hour's clip of each at a time):
        a row that goes on where an equal one (status, reason, what a backfill said) ends extends it."""
        with _transaction(self._writable()) as conn:
            for r in rows:
                said = (r.status, r.reason, r.backfilled_ticks, r.backfill_note, r.backfilled_at_us)
                if conn.execute(
                        "UPDATE coverage SET end_us = ? WHERE contract_id = ? AND tick_type = ? AND end_us = ? "
                        "AND is_open = 0 AND status = ? AND reason = ? AND backfilled_ticks IS ? AND backfill_note IS ? "
                        "AND backfilled_at_us IS ?", (r.end_us, r.contract_id, r.tick_type, r.start_us, *said)
                        ).rowcount == 0:
                    conn.execute(
                        "INSERT INTO coverage (contract_id, tick_type, status, reason, start_us, end_us, is_open, "
                        "backfilled_ticks, backfill_note, backfilled_at_us) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                        (r.contract_id, r.tick_type, r.status, r.reason, r.start_us, r.end_us, *said[2:]))

    def coverage_confirm(self, streams: list[tuple[int, str]], at_us: int) -> None:
        """Advance the open 'recorded' intervals of ``streams`` to ``at_us`` (all received is acknowledged)."""
        self._writable().executemany(
            "UPDATE coverage SET end_us = MAX(end_us, ?) "
            "WHERE contract_id = ? AND tick_type = ? AND is_open = 1 AND status = 'recorded'",
            [(at_us, cid, tt) for cid, tt in streams])

    def coverage_close_recorded(self, reason: str) -> int:
        """After a stop or crash: end every open 'recorded' interval where it was last confirmed and
        open a gap from there. Returns how many streams this changed."""
        rows = self._connection().execute(
            "SELECT contract_id, tick_type, end_us FROM coverage WHERE is_open = 1 AND status = 'recorded'"
        ).fetchall()
        for contract_id, tick_type, confirmed in rows:
            self.coverage_transition(contract_id, tick_type, confirmed, "gap", reason)
        return len(rows)

    def coverage(self, contract_id: int, tick_type: str, start_us: int, end_us: int) -> list[CoverageInterval]:
        """Coverage rows of a stream that overlap [start_us, end_us), oldest first."""
        rows = self._connection().execute(
            f"SELECT {_COVERAGE_COLUMNS} FROM coverage "
            "WHERE contract_id = ? AND tick_type = ? AND start_us < ? AND (end_us IS NULL OR end_us > ? "
            "OR (is_open = 1 AND status = 'recorded')) ORDER BY start_us, id",
            (contract_id, tick_type, end_us, start_us)).fetchall()
        return [_coverage_row(row) for row in rows]

    def closed_coverage(self, statuses: Sequence[str]) -> list[CoverageInterval]:
        """Every closed coverage row (of any stream) with one of these statuses, by stream and start."""
        rows = self._connection().execute(
            f"SELECT {_COVERAGE_COLUMNS} FROM coverage WHERE is_open = 0 AND end_us IS NOT NULL AND status IN "
            f"({', '.join('?' * len(statuses))}) ORDER BY contract_id, tick_type, start_us, id", tuple(statuses))
        return [_coverage_row(row) for row in rows]

    def swap_backfilled(self, gap: CoverageInterval, filled: CoverageInterval, old: Sequence[ArchiveEntry],
                        new: Sequence[ArchiveEntry], minute_bars: dict[int, bytes],
                        statistics: Sequence[DailyStatistics], at_us: int) -> None:
        """In one transaction (storage.backfill): the gap's coverage row becomes ``filled`` (refused with
        :class:`StorageError` if it is no longer as read), the hours of ``old`` lose their rows and each hour
        of ``new`` is answered by its new file, with its 1-minute bars, and the days' ``statistics`` are
        replaced; files of ``old`` no hour names any more become superseded."""
        with _transaction(self._writable()) as conn:
            updated = conn.execute(
                "UPDATE coverage SET status = ?, backfilled_ticks = ?, backfill_note = ?, backfilled_at_us = ? "
                "WHERE contract_id = ? AND tick_type = ? AND start_us = ? AND end_us = ? AND is_open = 0 "
                "AND status = ? AND backfilled_at_us IS ?",
                (filled.status, filled.backfilled_ticks, filled.backfill_note, filled.backfilled_at_us,
                 gap.contract_id, gap.tick_type, gap.start_us, gap.end_us, gap.status, gap.backfilled_at_us)).rowcount
            if updated != 1:
                raise StorageError(f"backfill: the coverage row {gap.status} {gap.start_us}..{gap.end_us} of "
                                   f"{gap.contract_id} {gap.tick_type} changed meanwhile; nothing was swapped")
            for before in old:
                hour = (before.contract_id, before.tick_type, before.hour_start_us)
                if conn.execute("DELETE FROM tick_archives WHERE contract_id = ? AND tick_type = ? AND "
                                "hour_start_us = ? AND file_path = ?", (*hour, before.file_path)).rowcount != 1:
                    raise StorageError(f"backfill: hour {before.hour_start_us} of {before.contract_id} "
                                       f"{before.tick_type} changed in the index meanwhile; nothing was swapped")
                conn.execute("DELETE FROM hour_bars WHERE contract_id = ? AND tick_type = ? AND hour_start_us = ?", hour)
            for entry in new:  # an hour archived meanwhile: UNIQUE refuses, nothing is swapped
                self._insert_archive(conn, entry)
                self._put_hour_bars(conn, entry.contract_id, entry.tick_type, entry.hour_start_us,
                                    minute_bars[entry.hour_start_us])
            for day in statistics:
                if day.total_ticks:
                    self._put_statistics(conn, day)
                else:
                    conn.execute("DELETE FROM data_statistics WHERE contract_id = ? AND tick_type = ? AND date = ?",
                                 (day.contract_id, day.tick_type, day.date))
            replaced_by = new[0].file_path if new else ""
            for path in sorted({e.file_path for e in old}):
                if conn.execute("SELECT 1 FROM tick_archives WHERE file_path = ?", (path,)).fetchone() is None:
                    conn.execute("INSERT OR REPLACE INTO superseded_files VALUES (?, ?, ?)", (path, replaced_by, at_us))

    # -- damage ------------------------------------------------------------------------------

    def record_damage(self, damage: Damage) -> None:
        names = ", ".join(Damage.__dataclass_fields__)
        marks = ", ".join("?" * len(Damage.__dataclass_fields__))
        self._writable().execute(f"INSERT INTO damage ({names}) VALUES ({marks})", tuple(damage.__dict__.values()))

    def damage(self, contract_id: int | None = None, tick_type: str | None = None, start_us: int = -(2**63),
               end_us: int = 2**63 - 1) -> list[Damage]:
        """Damaged spans (of one stream, or all) that overlap [start_us, end_us], oldest first."""
        names = ", ".join(Damage.__dataclass_fields__)
        sql = f"SELECT {names} FROM damage WHERE start_us <= ? AND end_us >= ?"
        args: tuple = (end_us, start_us)
        if contract_id is not None:
            sql += " AND contract_id = ? AND tick_type = ?"
            args += (contract_id, tick_type)
        return [Damage(*row) for row in self._connection().execute(sql + " ORDER BY start_us, id", args)]

    def remove_archive(self, contract_id: int, tick_type: str, hour_start_us: int) -> None:
        """Take an archived hour out of service (its file was quarantined): its row and its bars."""
        with _transaction(self._writable()) as conn:
            for table in ("tick_archives", "hour_bars"):
                conn.execute(f"DELETE FROM {table} WHERE contract_id = ? AND tick_type = ? AND hour_start_us = ?",
                             (contract_id, tick_type, hour_start_us))

    # -- retention -----------------------------------------------------------------------------

    def expire(self, entries: list[ArchiveEntry], at_us: int) -> None:
        """In one transaction: these archived hours stop being served (their rows move from
        ``tick_archives`` to ``expired_hours``); pre-aggregates, statistics and coverage stay."""
        with _transaction(self._writable()) as conn:
            for e in entries:
                conn.execute("INSERT OR REPLACE INTO expired_hours VALUES (?, ?, ?, ?, ?, ?, 0)",
                             (e.contract_id, e.tick_type, e.hour_start_us, e.tick_count, e.file_path, at_us))
                conn.execute("DELETE FROM tick_archives WHERE contract_id = ? AND tick_type = ? AND hour_start_us = ?",
                             (e.contract_id, e.tick_type, e.hour_start_us))

    def expired(self, contract_id: int | None = None, tick_type: str | None = None, start_us: int = 0,
                end_us: int = 2**62, *, files_left_before_us: int | None = None) -> list[ExpiredHour]:
        """Expired hours (of a stream) overlapping [start_us, end_us), oldest first; with
        ``files_left_before_us``, only those whose file is not yet removed and that expired before it."""
        sql = "SELECT * FROM expired_hours WHERE hour_start_us < ? AND hour_start_us + ? > ?"
        args: list = [end_us, 3_600_000_000, start_us]
        if contract_id is not None:
            sql, args = sql + " AND contract_id = ? AND tick_type = ?", args + [contract_id, tick_type]
        if files_left_before_us is not None:
            sql, args = sql + " AND file_removed = 0 AND expired_at_us <= ?", args + [files_left_before_us]
        rows = self._connection().execute(sql + " ORDER BY contract_id, tick_type, hour_start_us", args).fetchall()
        return [ExpiredHour(cid, tick, hour, count, path, at, bool(removed))
                for cid, tick, hour, count, path, at, removed in rows]

    def expired_until(self, contract_id: int, tick_type: str) -> int | None:
        """The end of a stream's last expired hour (raw ticks before it are gone), or None."""
        row = self._connection().execute("SELECT MAX(hour_start_us) FROM expired_hours WHERE contract_id = ? AND "
                                         "tick_type = ?", (contract_id, tick_type)).fetchone()
        return None if row[0] is None else row[0] + 3_600_000_000

    def expired_paths(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT file_path FROM expired_hours")}

    def mark_removed(self, hours: list[ExpiredHour]) -> None:
        self._writable().executemany(
            "UPDATE expired_hours SET file_removed = 1 WHERE contract_id = ? AND tick_type = ? AND hour_start_us = ?",
            [(h.contract_id, h.tick_type, h.hour_start_us) for h in hours])

    def put_statistics(self, statistics: DailyStatistics) -> None:
        """Keep a day's statistics; a day with no tick left loses its row."""
        if statistics.total_ticks == 0:
            self._writable().execute("DELETE FROM data_statistics WHERE contract_id = ? AND tick_type = ? AND date = ?",
                                     (statistics.contract_id, statistics.tick_type, statistics.date))
            return
        self._put_statistics(self._writable(), statistics)

    @staticmethod
    def _put_statistics(conn: sqlite3.Connection, statistics: DailyStatistics) -> None:
        conn.execute("INSERT OR REPLACE INTO data_statistics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     tuple(statistics.__dict__.values()))

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the index at one instant (SQLite's online backup), fsynced."""
        destination = sqlite3.connect(target)
        try:
            self._connection().backup(destination)
        finally:
            destination.close()
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())

    def integrity_problems(self) -> list[str]:
        """What SQLite's ``PRAGMA integrity_check`` finds wrong (empty when the database is sound)."""
        rows = [row[0] for row in self._connection().execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def close(self) -> None:
        """Close every connection; the last one checkpoints the WAL into the database file, so
        ``index.sqlite`` alone holds everything committed."""
        with self._connections_lock:
            connections = list(self._open)
            self._open, self._idle = set(), []
        for conn in connections[:-1]:
            conn.close()
        for conn in connections[-1:]:
            try:
                if not self.read_only:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            conn.close()
        self._local = threading.local()
