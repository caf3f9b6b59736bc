"""Result cache: query results over *closed* ranges, LRU with a byte bound and a TTL.

A range is closed when every hour it touches is published in the archive: the writer refuses
ticks for sealed hours, so such a result changes only when closed hours are rewritten (backfill,
retention, compaction, quarantine, an import), which clears the cache. Ranges that reach into the
buffer (closed or open segments) are never cached, so they are never served stale.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

import pyarrow as pa
from cachetools import TTLCache

REWRITES_CHECK_SECONDS = 0.001  # a measured 50 us an index read on a busy server, up to 3 per query


class ResultCache:
    """Thread-safe LRU of Arrow tables bounded by ``max_bytes`` (their buffers' size), each
    entry dropped ``ttl_seconds`` after it was stored. ``max_bytes=0`` disables caching.

    ``rewrites`` (a store reading beside another process's writer: :meth:`Index.rewrites`) counts
    the writer's changes to closed ranges; the cache is cleared whenever it moves. It is read on a
    lookup at most every ``REWRITES_CHECK_SECONDS``, so a server in another process serves a backfill in
    the recorder from a millisecond after its commit (one query asks the cache up to three times)."""

    def __init__(self, max_bytes: int, ttl_seconds: float, rewrites: Callable[[], int] | None = None):
        self.max_bytes = max_bytes
        self._rewrites = rewrites
        self._rewrites_seen = rewrites() if rewrites is not None else 0
        self._rewrites_read_at = time.monotonic()
        self._tables: TTLCache = TTLCache(maxsize=max(max_bytes, 1), ttl=ttl_seconds, getsizeof=_size)
        self._lock = threading.Lock()
        self._pending: dict[Hashable, _Pending] = {}  # keys being computed, by the first caller that missed
        self._generation = 0  # bumped by clear(): whatever was computed or planned before it may be stale
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        """Moves with each :meth:`clear`: what was computed or planned at another generation may be stale."""
        self._check_rewrites()
        return self._generation

    def _check_rewrites(self) -> None:
        if self._rewrites is None or (now := time.monotonic()) - self._rewrites_read_at < REWRITES_CHECK_SECONDS:
            return
        self._rewrites_read_at = now
        if (seen := self._rewrites()) != self._rewrites_seen:
            self._rewrites_seen = seen
            self.clear()

    def get(self, key: Hashable) -> pa.Table | None:
        self._check_rewrites()
        with self._lock:
            table = self._tables.get(key)
            self.hits += table is not None
            return table

    def get_or_compute(self, key: Hashable, compute: Callable[[], pa.Table]) -> pa.Table:
        """The cached table of ``key``, or ``compute()``'s, kept if it fits in a quarter of the cache.

        Concurrent misses of one key compute it once: the others wait and share its table (whether kept
        or not); if that computation fails, each of them computes on its own. A computation that a
        :meth:`clear` overtook is not kept, and no caller after the clear waits for it."""
        self._check_rewrites()
        with self._lock:
            generation = self._generation
            table = self._tables.get(key)
            if table is not None:
                self.hits += 1
                return table
            under_way = self._pending.get(key)
            if under_way is None:
                self.misses += 1
                pending = self._pending[key] = _Pending()
            else:
                self.hits += 1  # served from the computation under way
        if under_way is not None:
            under_way.done.wait()
            return under_way.table if under_way.table is not None else compute()
        try:
            table = compute()
            pending.table = table
            if 0 < _size(table) <= self.max_bytes // 4:
                with self._lock:
                    if self._generation == generation:
                        self._tables[key] = table
            return table
        finally:
            with self._lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]
            pending.done.set()

    @property
    def current_bytes(self) -> int:
        with self._lock:
            return int(self._tables.currsize)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def clear(self) -> None:
        """Forget every result (the data under them changed): computations under way are not kept."""
        with self._lock:
            self._tables.clear()
            self._pending.clear()
            self._generation += 1


class _Pending:
    """One key's computation in progress: set when it ended; ``table`` is None if it failed."""

    def __init__(self):
        self.done = threading.Event()
        self.table: pa.Table | None = None


def _size(table: pa.Table) -> int:
    return max(table.nbytes, 1)
