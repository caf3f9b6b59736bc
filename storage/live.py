"""Live streams: everything stored from a position on, then every tick as it is acknowledged.

Position and cursor
    Ticks of a stream are ordered by ``ts`` and, within one ``ts``, by arrival. The cursor
    ``"<ts>:<n>"`` names the position just after the ``n``-th tick (1-based) whose ``ts`` is
    ``<ts>`` microseconds: resuming after it gives exactly the ticks that follow, across the
    archive, the segments and the in-memory tail, with no overlap and no hole. The same pair is
    the key by which a client deduplicates: the tick at position (ts, k) is unique.

Seam between history and live
    In the recording process a :class:`Subscription` is registered under the same lock as the
    buffer snapshot the history is read from, so every batch acknowledged later reaches the
    subscription and no batch reaches both. A read-only store (another process) has no writer
    to subscribe to; it reads the store again from the cursor after each acknowledgement
    (:class:`Acknowledgements`), and at least every ``poll_interval``.

Slow subscribers
    A subscription holds at most ``max_rows`` ticks that its reader has not taken yet. Past that
    it is dropped (the writer never waits for a reader), and the reader ends its stream with
    :class:`~ibstream.core.errors.SubscriberTooSlowError` naming the cursor to resume from.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ibstream.core.cursors import Cursor
from ibstream.core.errors import InvalidRequestError, SubscriberTooSlowError
from ibstream.core.ticks import StreamKey
from ibstream.core.times import FOREVER_US, as_micros, now_us
from ibstream.storage.bars import BAR_RESOLUTIONS, bar_schema, finish, partial_bars, rollup
from ibstream.storage.schemas import schema_for
from ibstream.storage.segments import stream_dir

try:
    import inotify_simple
except ImportError:  # not Linux: live readers in another process poll
    inotify_simple = None

HEARTBEAT_SECONDS = 2.0  # an empty batch with the cursor is sent when nothing happened for this long


class Subscription:
    """Batches acknowledged after registration, held for one reader, bounded by ``max_rows``."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.overflowed = False
        self._batches: deque[pa.RecordBatch] = deque()
        self._rows = 0
        self._ready = threading.Condition()

    def offer(self, batch: pa.RecordBatch) -> None:
        """Called by the writer with each acknowledged batch; never blocks."""
        with self._ready:
            if self.overflowed:
                return
            if self._rows + batch.num_rows > self.max_rows:
                self.overflowed = True
                self._batches.clear()
                self._rows = 0
            else:
                self._batches.append(batch)
                self._rows += batch.num_rows
            self._ready.notify()

    def take(self, timeout: float) -> list[pa.RecordBatch]:
        """Everything offered so far (waiting up to ``timeout`` s for something)."""
        with self._ready:
            if not self._batches and not self.overflowed:
                self._ready.wait(timeout)
            batches = list(self._batches)
            self._batches.clear()
            self._rows = 0
            return batches


class Acknowledgements:
    """Wakes a reader in another process when the recorder acknowledges a batch of one stream.

    The writer touches the open segment after each acknowledgement
    (:func:`storage.segments.announce_acknowledged`), which inotify reports as ``IN_ATTRIB`` on
    the stream's folder (rotation included). The kernel queues the events between two waits, so
    an acknowledgement that lands while the reader reads the store wakes the next wait at once.
    Where inotify is missing (not Linux, the per-user instance limit reached) or never fires
    (another host's NFS, a recorder of an older version), :meth:`wait` returns after its timeout:
    the reader polls.
    """

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory = directory
        self._inotify = None
        self._watching = False
        if enabled and inotify_simple is not None:
            try:
                self._inotify = inotify_simple.INotify()
            except OSError:  # e.g. fs.inotify.max_user_instances reached
                pass
        self._watch()

    def _watch(self) -> None:
        if self._inotify is None or self._watching:
            return
        try:
            self._inotify.add_watch(self.directory, inotify_simple.flags.ATTRIB)
            self._watching = True
        except OSError:  # the folder does not exist yet (nothing recorded so far): tried again on the next wait
            pass

    def wait(self, timeout: float) -> bool:
        """Until an acknowledgement newer than the last wait (True), or ``timeout`` seconds (False)."""
        self._watch()
        if self._inotify is None or not self._watching:
            time.sleep(timeout)
            return False
        events = self._inotify.read(timeout=round(timeout * 1000))
        if any(event.mask & inotify_simple.flags.IGNORED for event in events):
            self._watching = False  # the folder was removed: watched again once it is back
        return bool(events)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()


class LiveFeed:
    """Ticks of one stream after a cursor: history first, then live, until ``end_us``.

    ``batches()`` yields ``(batch, cursor, live)``: ``cursor`` is the position after the batch,
    ``live`` whether history has been caught up with. Empty batches mark the seam (the first
    with ``live`` true) and heartbeats.
    """

    def __init__(self, store, key: StreamKey, cursor: Cursor, end_us: int = FOREVER_US, *,
                 max_rows: int = 1_000_000, poll_interval: float = 0.05):
        if getattr(store, "replica", None) is not None:
            raise InvalidRequestError(
                "live streams are served by the server beside the recorder; this is a read server of the published "
                "archive (archived hours only): ask the recorder's server, or a coordinator, for live data")
        self.store = store
        self.key = key
        self.schema = schema_for(key.tick_type)
        self.cursor = cursor
        self.end_us = end_us
        self.max_rows = max_rows
        self.poll_interval = poll_interval
        self._reached_end = False
        self._read_seconds = 0.0  # how long the last read of the store took (another process records)

    def batches(self, stopped: Callable[[], bool]) -> Iterator[tuple[pa.RecordBatch, Cursor, bool]]:
        subscription = Subscription(self.max_rows) if self.store.writer is not None else None
        # watched before history is read, so an acknowledgement in between is not waited for
        acknowledgements = Acknowledgements(stream_dir(self.store.settings.buffer_root, self.key),
                                            enabled=subscription is None and self.store.settings.live_notify)
        try:
            plan = self.store.planner.plan(self.key, self.cursor.ts, self.end_us, self.store.settings.batch_rows,
                                           subscription=subscription)
            yield from self._emit(self.cursor.unseen(plan.batches()), live=False)
            if self._ended():
                return
            yield self._empty(), self.cursor, True  # history caught up with: the seam
            fresh = (lambda: self._taken(subscription)) if subscription else (lambda: self._polled(acknowledgements))
            yield from self._emit(self._follow(fresh, stopped), live=True)
        finally:
            acknowledgements.close()
            if subscription is not None:
                self.store.writer.unsubscribe(self.key, subscription)

    def _emit(self, batches, live: bool) -> Iterator[tuple[pa.RecordBatch, Cursor, bool]]:
        for batch in batches:
            if batch is None:  # heartbeat
                yield self._empty(), self.cursor, live
                continue
            batch = self._clip(batch)
            if batch.num_rows:
                self.cursor = self.cursor.after(batch)
                yield batch, self.cursor, live
            if self._reached_end:
                return

    def _clip(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` from the cursor's time (a start in the future) up to ``end``; reaching a tick at
        or after ``end`` ends the stream."""
        ts = as_micros(batch.column("ts"))
        first = int(np.searchsorted(ts, self.cursor.ts, side="left"))
        keep = int(np.searchsorted(ts, self.end_us, side="left"))
        self._reached_end = self._reached_end or keep < len(ts)
        return batch.slice(first, max(0, keep - first))

    def _ended(self) -> bool:
        """Past ``end``: no tick before it can be acknowledged any more (ts is the receive time;
        one second covers the recorder's flush)."""
        return self._reached_end or (self.end_us < FOREVER_US and now_us() > self.end_us + 1_000_000)

    def _follow(self, fresh: Callable[[], list[pa.RecordBatch]], stopped) -> Iterator[pa.RecordBatch | None]:
        """New batches, round after round of ``fresh()``, with a heartbeat (None) when quiet."""
        quiet_since = time.monotonic()
        while not stopped() and not self._ended():
            batches = fresh()
            yield from batches
            if batches:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > HEARTBEAT_SECONDS:
                quiet_since = time.monotonic()
                yield None

    def _taken(self, subscription: Subscription) -> list[pa.RecordBatch]:
        """What the recorder acknowledged since the last round (this process records)."""
        batches = subscription.take(timeout=0.1)
        if subscription.overflowed:
            raise SubscriberTooSlowError(
                f"stream {self.key}: this reader fell more than {self.max_rows:,} ticks behind the recorder "
                f"(IBSTREAM_LIVE_QUEUE_ROWS) and was dropped; resume from cursor {self.cursor} "
                "(the client does this itself)")
        return batches

    def _polled(self, acknowledgements: Acknowledgements) -> list[pa.RecordBatch]:
        """Another process records: read the store again from the cursor after its next
        acknowledgement, or after ``poll_interval``. The reader first rests as long as its last
        read took (up to ``poll_interval``): woken by every acknowledgement (a recorder may commit
        every millisecond), reads would otherwise follow each other back to back."""
        rest = min(self._read_seconds, self.poll_interval)
        time.sleep(rest)
        acknowledgements.wait(self.poll_interval - rest)
        started = time.monotonic()
        plan = self.store.planner.plan(self.key, self.cursor.ts, self.end_us, self.store.settings.batch_rows)
        batches = list(self.cursor.unseen(plan.batches()))
        self._read_seconds = time.monotonic() - started
        return batches

    def _empty(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([], schema=self.schema)


class LiveBars:
    """Bars of a live feed: each closed bar once, the forming bar again after every new batch.

    Rows are the bar schema (:func:`storage.bars.bar_schema`) plus ``forming`` (bool). A row
    replaces every earlier row with the same ``ts``: a forming row is the bar so far. A bar
    closes when a tick of a later bar arrives, or once the clock has passed its end by
    ``CLOSE_GRACE_US`` (time enough for the recorder to acknowledge a tick stamped before it;
    should one still come, the bar is sent again with it). During history only closed bars are
    sent; the forming bar follows at the seam.
    """

    CLOSE_GRACE_US = 1_000_000

    def __init__(self, feed: LiveFeed, resolution: str):
        self.feed = feed
        self.resolution = resolution
        self.step = BAR_RESOLUTIONS[resolution]
        self.schema = live_bar_schema(feed.key.tick_type, resolution)
        self._forming: pl.DataFrame | None = None  # partial bar of the bar being formed
        self._closed_by_time = False  # the forming bar was sent as closed because its time passed

    @property
    def cursor(self) -> Cursor:
        return self.feed.cursor

    def batches(self, stopped) -> Iterator[tuple[pa.RecordBatch, Cursor, bool]]:
        tick_type = self.feed.key.tick_type
        caught_up = False
        for ticks, cursor, live in self.feed.batches(stopped):
            seam, caught_up = live and not caught_up, caught_up or live
            closed, with_forming = [], live and (ticks.num_rows > 0 or seam)  # not again on heartbeats
            if ticks.num_rows:
                merged = partial_bars(pa.Table.from_batches([ticks]), tick_type, self.step)
                if (self._closed_by_time and self._forming is not None
                        and merged.get_column("ts")[0] != self._forming.get_column("ts")[0]):
                    self._forming = None  # already sent as closed, and these ticks belong to later bars
                if self._forming is not None:
                    merged = rollup(pl.concat([self._forming, merged], how="vertical_relaxed"), tick_type, self.step)
                closed, self._forming, self._closed_by_time = [merged.head(merged.height - 1)], merged.tail(1), False
            elif self._forming is not None and not self._closed_by_time and self._time_closed(self._forming):
                # announced closed, but kept: a late tick of this bar re-opens it (the row replaces this one)
                closed, with_forming, self._closed_by_time = [self._forming], False, True
            yield self._rows(closed, with_forming=with_forming), cursor, live

    def _time_closed(self, forming: pl.DataFrame) -> bool:
        start = forming.get_column("ts").cast(pl.Int64)[0]
        return now_us() > start + self.step + self.CLOSE_GRACE_US

    def _rows(self, closed: list[pl.DataFrame], with_forming: bool) -> pa.RecordBatch:
        tick_type = self.feed.key.tick_type
        parts = [finish(c, tick_type, self.resolution).append_column("forming", pa.array([False] * c.height))
                 for c in closed if c.height]
        if with_forming and self._forming is not None:
            parts.append(finish(self._forming, tick_type, self.resolution).append_column("forming", pa.array([True])))
        if not parts:
            return pa.RecordBatch.from_pylist([], schema=self.schema)
        return pa.concat_tables([p.cast(self.schema) for p in parts]).combine_chunks().to_batches()[0]


def live_bar_schema(tick_type, resolution: str) -> pa.Schema:
    """The schema of live bars: the bar schema plus ``forming``."""
    schema = bar_schema(tick_type, resolution)
    return schema.append(pa.field("forming", pa.bool_(), nullable=False))
