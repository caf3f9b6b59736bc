"""The recorder: feed callbacks -> columnar builders -> group commit into the store.

Callbacks only append a row to an in-memory builder (no disk I/O on the feed's thread).
A flusher thread turns each builder into one Arrow record batch and appends it to the store:
once ``Store.append`` returns, those ticks are acknowledged. It is woken by the first tick after a
flush (group commit on demand) and starts flushes at most every ``flush_interval``, so ticks that
trickle in are stored within one flush's time and a busy feed gets one fsync per stream per interval.
``ts`` is the local receive time in microseconds, held non-decreasing per stream (if the
clock steps back, ``ts`` stays at the last value until the clock catches up), starting from
the stream's last stored tick, so a clock that stepped back across a restart is clamped too.

Coverage: the feed reports when a stream starts and stops being recorded
(:meth:`Recorder.on_stream_state`); the flusher writes those transitions to the index after
the ticks received before them are acknowledged, and confirms the open 'recorded' interval
up to each flush (at most once a second), so after a crash coverage ends where the last
acknowledged flush did. Index writes that fail (a full disk) are kept and retried.

Storage failure: when the store cannot write (:class:`~ibstream.core.errors.StorageUnavailableError`:
disk full, I/O error), the ticks it did not acknowledge are held, in order, and retried with
exponential backoff (``flush_interval`` doubling up to ``storage_retry_max``), never
duplicated: a partly stored batch is retried from its first unacknowledged row. A stream holds
at most ``max_held_ticks``; past it the newest ticks are dropped and counted, and coverage gets a
'storage_unavailable' gap from the first dropped tick to the first one kept again. Ticks the
store refuses for good (out of order, for an archived hour, malformed) are dropped and counted,
with a 'refused_by_store' gap. Every change of state is one log line, plus a summary every
``storage_summary_interval`` while storage is unavailable or ticks are dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np
import pyarrow as pa

from ibstream.core.errors import StorageError
from ibstream.core.times import US_PER_SECOND, now_us
from ibstream.core.units import byte_text
from ibstream.recorder.feed import Size
from ibstream.settings import Settings
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import SIZE, TickType, schema_for
from ibstream.storage.segments import StreamKey
from ibstream.storage.store import Store

log = logging.getLogger(__name__)

AckListener = Callable[[StreamKey, pa.RecordBatch], None]
FlushListener = Callable[[float, int], None]  # (seconds the flush took, ticks it acknowledged)
CONFIRM_EVERY_US = US_PER_SECOND
DISK_CHECK_EVERY = 10.0  # seconds between free-space checks
IDLE_FLUSH = 0.1  # seconds between flushes while nothing arrives
NO_TS = -(2**63)


@dataclass(frozen=True)
class _StateChange:
    key: StreamKey
    at_us: int
    recording: bool
    reason: str


@dataclass(frozen=True)
class _Roll:
    root: str
    contract_id: int
    active_from_us: int


@dataclass
class _Gap:
    """Ticks of a stream being dropped since ``start`` (the first dropped tick's ts)."""

    start: int
    reason: str
    dropped: int = 0


@dataclass(slots=True, eq=False)
class _Builder:
    key: StreamKey
    rows: list[tuple] = field(default_factory=list)  # not yet acknowledged, oldest first
    last_ts: int = NO_TS
    in_flight: int = 0  # rows taken by the flush under way (still held: they count against the bound)
    gap: _Gap | None = None
    received: int = 0  # ticks the feed delivered (acknowledged, held or dropped)
    last_received_us: int | None = None  # wall-clock time the feed last delivered a tick

    def held(self) -> int:
        return len(self.rows) + self.in_flight


@dataclass
class _Outage:
    """The store refusing writes: why, since when (monotonic), and when to try again."""

    reason: str  # e.g. "[Errno 28] No space left on device"
    short: str  # e.g. "No space left on device"
    since: float
    delay: float
    next_attempt: float
    acknowledged_before: int
    dropped_before: int
    last_summary: float


def rows_to_batch(tick_type: TickType, rows: list[tuple]) -> pa.RecordBatch:
    """One record batch of the tick type's schema from row tuples in schema column order."""
    schema = schema_for(tick_type)
    arrays = [_column([row[i] for row in rows], f.type) for i, f in enumerate(schema)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


_SIZE_SCALE = 10**SIZE.scale
_SIZE_LIMIT = 10 ** (SIZE.precision - SIZE.scale)  # whole numbers below this fit the size type


def _column(values: list, type_: pa.DataType) -> pa.Array:
    """One column of a batch. Timestamps go through int64 (pyarrow converts Python ints to a tz-aware
    timestamp ~2x slower), and sizes that are all Python ints (ibapi 9.81's) become decimals by scaling
    in numpy (4x faster than pyarrow's per-value Decimal path); anything else takes pyarrow's path."""
    if pa.types.is_timestamp(type_):
        return pa.array(values, pa.int64()).view(type_)
    if type_ == SIZE and values and set(map(type, values)) == {int} and -_SIZE_LIMIT < min(values) and max(values) < _SIZE_LIMIT:
        scaled = pa.array(values, pa.int64()).to_numpy() * _SIZE_SCALE
        words = np.empty((len(values), 2), np.int64)  # decimal128: 16 bytes, little endian, two's complement
        words[:, 0], words[:, 1] = scaled, scaled >> 63
        return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(words)])
    return pa.array(values, type=type_)


def _sample_row(tick_type: TickType) -> tuple:
    """One row of the tick type as the callbacks build it (Decimal sizes, strings, bools)."""
    values: list[object] = []
    for f in schema_for(tick_type):
        if pa.types.is_decimal(f.type):
            values.append(Decimal(1))
        elif pa.types.is_string(f.type):
            values.append("")
        elif pa.types.is_boolean(f.type):
            values.append(False)
        elif pa.types.is_floating(f.type):
            values.append(1.0)
        else:
            values.append(0)
    return tuple(values)


def _describe(exc: OSError) -> tuple[str, str]:
    """A storage error as a log reason ("[Errno 28] No space left on device") and a short form."""
    if exc.errno:
        short = os.strerror(exc.errno)
        return f"[Errno {exc.errno}] {short}", short
    return str(exc), str(exc)


def _count(n: int) -> str:
    return f"{n:,}"



class Recorder:
    """Records ticks from a feed into a writable :class:`~storage.store.Store`.

    Limits come from ``settings`` (by default ``Settings.of(store.settings)``): ``max_held_ticks``,
    ``storage_retry_max``, ``storage_summary_interval``, ``disk_warn_free_bytes`` and ``stop_flush_timeout``.
    """

    def __init__(self, store: Store, *, flush_interval: float = 0.005, clock: Callable[[], int] = now_us,
                 settings: Settings | None = None):
        settings = settings or Settings.of(store.settings)
        self.store = store
        self.flush_interval = flush_interval
        self.clock = clock
        self.max_held_ticks = settings.max_held_ticks
        self.retry_max = max(settings.storage_retry_max.total_seconds(), flush_interval)
        self.summary_interval = settings.storage_summary_interval.total_seconds()
        self.disk_warn_free_bytes = settings.disk_warn_free_bytes
        self.stop_timeout = settings.stop_flush_timeout.total_seconds()
        self.acknowledged: dict[StreamKey, int] = {}
        self.dropped: dict[StreamKey, int] = {}
        self.recording: dict[StreamKey, bool] = {}
        self.ack_listeners: list[AckListener] = []
        self.flush_listeners: list[FlushListener] = []  # after each flush that had ticks to store
        self._builders: dict[StreamKey, _Builder] = {}
        self._by_type: dict[TickType, dict[int, _Builder]] = {t: {} for t in TickType}  # the callbacks' lookup
        self._bid_ask = self._by_type[TickType.BID_ASK]
        self._feed_recording: dict[StreamKey, bool] = {}  # as the feed last said (coverage may lag)
        self._changes: list[_StateChange | ContractDetails | _Roll] = []
        self._last_confirm = 0
        self._outage: _Outage | None = None
        self._index_outage: tuple[float, str] | None = None  # since (monotonic), reason
        self._refusing: dict[StreamKey, int] = {}  # streams whose ticks the store refuses: how many so far
        self._low_space = False
        self._last_drop_summary = 0.0
        closed = store.index.coverage_close_recorded("recorder_crashed")
        if closed:
            log.warning("%d stream(s) were being recorded when the last recorder stopped without closing them; "
                        "their coverage ends at the last confirmed flush", closed)
        self._start_from_store()
        self._warm_up()
        self._lock = threading.Lock()
        self._pending = False  # rows or changes arrived since the last flush took them (the flusher was woken)
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start_from_store(self) -> None:
        """Start each stored stream's ``ts`` clamp at its last stored tick (or its archived hours'
        end), so a wall clock that stepped back across a restart cannot make every append fail."""
        writer = self.store.writer
        starts = {StreamKey(cid, TickType(tt)): until for (cid, tt), until in self.store.index.archived_until().items()}
        if writer is not None:
            for key in writer.streams():
                starts[key] = max(starts.get(key, NO_TS), writer.last_ts(key))
        for key, start in starts.items():
            self._builder(key).last_ts = start

    def _builder(self, key: StreamKey) -> _Builder:
        builder = self._builders.get(key)
        if builder is None:
            builder = self._builders[key] = self._by_type[key.tick_type][key.contract_id] = _Builder(key)
        return builder

    @property
    def received(self) -> dict[StreamKey, int]:
        """Ticks the feed delivered per stream (acknowledged, held or dropped)."""
        return {key: b.received for key, b in list(self._builders.items()) if b.received}

    @property
    def last_received_us(self) -> dict[StreamKey, int]:
        """Wall-clock time the feed last delivered a tick, per stream."""
        return {key: b.last_received_us for key, b in list(self._builders.items()) if b.last_received_us is not None}

    @staticmethod
    def _warm_up() -> None:
        """Build (and discard) one batch per tick type: the first ``pa.array`` over Decimal sizes
        imports pandas (200-700 ms), which would otherwise stall the first flush."""
        for tick_type in TickType:
            rows_to_batch(tick_type, [_sample_row(tick_type)])

    # -- TickSink ------------------------------------------------------------------------------

    def on_bid_ask(self, contract_id: int, ib_time: int, bid_price: float, ask_price: float,
                   bid_size: Size, ask_size: Size, bid_past_low: bool, ask_past_high: bool) -> None:
        builder = self._bid_ask.get(contract_id) or self._new_builder(contract_id, TickType.BID_ASK)
        self._add(builder, ib_time, (bid_price, ask_price, bid_size, ask_size, bid_past_low, ask_past_high))

    def on_trade(self, contract_id: int, tick_type: TickType, ib_time: int, price: float, size: Size,
                 exchange: str, special_conditions: str, past_limit: bool, unreported: bool) -> None:
        builder = self._by_type[tick_type].get(contract_id) or self._new_builder(contract_id, tick_type)
        self._add(builder, ib_time, (price, size, exchange, special_conditions, past_limit, unreported))

    def on_mid_point(self, contract_id: int, ib_time: int, mid_point: float) -> None:
        builder = self._by_type[TickType.MID_POINT].get(contract_id) or self._new_builder(contract_id, TickType.MID_POINT)
        self._add(builder, ib_time, (mid_point,))

    def _new_builder(self, contract_id: int, tick_type: TickType | str) -> _Builder:
        with self._lock:
            return self._builder(StreamKey(contract_id, TickType(tick_type)))

    def on_stream_state(self, contract_id: int, tick_type: TickType | str, recording: bool, reason: str,
                        at_us: int | None = None) -> None:
        """The feed started (``recording``) or stopped receiving a stream at ``at_us`` (default: now; never
        before the stream's last tick nor after now); ``reason`` says why."""
        key = StreamKey(contract_id, TickType(tick_type))
        now = self.clock()
        with self._lock:
            builder = self._builders.get(key)
            at = now if at_us is None else max(min(at_us, now), builder.last_ts + 1 if builder is not None else at_us)
            change = _StateChange(key, at, recording, reason)
            self._feed_recording[change.key] = recording
            if builder is not None and builder.gap is not None:
                if recording:
                    return  # still dropping: the first tick kept again opens the recorded interval
                self._changes.append(_StateChange(change.key, builder.gap.start, False, builder.gap.reason))
                builder.gap = None
            self._changes.append(change)
        self._wake.set()

    def on_contract_details(self, details: ContractDetails) -> None:
        """Keep a contract's IB details (exchange, hours, time zone) in the index."""
        with self._lock:
            self._changes.append(details)
        self._wake.set()

    def on_roll(self, root: str, contract_id: int, active_from_us: int) -> None:
        """Record the roll schedule of a continuous future in the index (:meth:`Store.record_roll`)."""
        with self._lock:
            self._changes.append(_Roll(root, contract_id, active_from_us))
        self._wake.set()

    def _add(self, builder: _Builder, ib_time: int, fields: tuple) -> None:
        received = self.clock()
        with self._lock:
            ts = received if received > builder.last_ts else builder.last_ts
            builder.last_ts = ts
            builder.received += 1
            builder.last_received_us = received
            if builder.gap is None and len(builder.rows) + builder.in_flight < self.max_held_ticks:
                builder.rows.append((ts, ib_time * US_PER_SECOND, *fields))  # the path of every tick
                if not self._pending:
                    self._pending = True
                    self._wake.set()
                return
            message = self._add_past_bound(builder, ts, ib_time, fields)
        if message is not None:
            log.log(*message)

    def _add_past_bound(self, builder: _Builder, ts: int, ib_time: int, fields: tuple) -> tuple | None:
        """A tick of a stream that holds ``max_held_ticks`` (dropped, opening a gap) or that was dropping
        (kept, closing the gap); the log message to write, if any. Called with the lock held."""
        key = builder.key
        if len(builder.rows) + builder.in_flight >= self.max_held_ticks:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            message = None
            if builder.gap is None:
                builder.gap = _Gap(ts, "storage_unavailable")
                self._last_drop_summary = time.monotonic()
                message = (logging.ERROR, "%s: holding %s unstored ticks, the most allowed (max_held_ticks); "
                           "dropping the newest until storage takes them, coverage marks the gap",
                           key, _count(builder.held()))
            builder.gap.dropped += 1
            return message
        gap = builder.gap
        assert gap is not None
        if self._feed_recording.get(key):
            self._changes += [_StateChange(key, gap.start, False, gap.reason), _StateChange(key, ts, True, "subscribed")]
        builder.gap = None
        builder.rows.append((ts, ib_time * US_PER_SECOND, *fields))
        return (logging.WARNING, "%s: keeping ticks again after dropping %s; coverage has a %s gap of %.1f s",
                key, _count(gap.dropped), gap.reason, (ts - gap.start) / US_PER_SECOND)

    # -- what operators look at ----------------------------------------------------------------

    def held(self, key: StreamKey | None = None) -> int:
        """Ticks received and not yet acknowledged: of one stream, or of all."""
        with self._lock:
            if key is not None:
                builder = self._builders.get(key)
                return builder.held() if builder else 0
            return sum(b.held() for b in self._builders.values())

    def storage_state(self, key: StreamKey) -> str:
        """How a stream's ticks fare: ``storing``, ``STORAGE UNAVAILABLE (No space left on device),
        holding 12,000 ticks``, ``DROPPING (12,345 dropped)`` or ``REFUSED BY STORE (120 dropped)``."""
        builder = self._builders.get(key)
        dropped = self.dropped.get(key, 0)
        earlier = f", {_count(dropped)} dropped earlier" if dropped else ""
        if builder is not None and builder.gap is not None:
            return f"DROPPING ({_count(dropped)} dropped)"
        if key in self._refusing:
            return f"REFUSED BY STORE ({_count(dropped)} dropped)"
        outage = self._outage
        if outage is not None:
            held = builder.held() if builder is not None else 0
            return f"STORAGE UNAVAILABLE ({outage.short}), holding {_count(held)} ticks{earlier}"
        return "storing" + earlier

    @property
    def storage_available(self) -> bool:
        return self._outage is None

    # -- group commit --------------------------------------------------------------------------

    def flush(self) -> int:
        """Append everything received so far; returns the number of ticks acknowledged.

        Always tries the store (the flusher thread calls it less often while storage is down).
        """
        with self._flush_lock:
            started = time.perf_counter()
            with self._lock:
                snapshot = self.clock()
                pending = {}
                for key, builder in self._builders.items():
                    if builder.rows:
                        pending[key], builder.rows = builder.rows, []
                        builder.in_flight = len(pending[key])
                changes, self._changes = self._changes, []
                self._pending = False
            acked = 0
            stored_all = False  # some stream's ticks all stored: the store writes again
            failure: OSError | None = None
            held: set[StreamKey] = set()
            for key, rows in pending.items():
                stored, error, refused = self._append(key, rows)
                acked += stored
                kept = rows[stored:] if error is not None else []
                with self._lock:
                    builder = self._builders[key]
                    builder.in_flight = 0
                    if kept:
                        builder.rows[:0] = kept
                if error is not None:
                    failure = error
                    held.add(key)
                elif not refused:
                    stored_all = True
                if refused:
                    changes = self._refused_gap(key, rows, changes)
            if failure is not None or stored_all:
                self._storage_outcome(failure)
            self._record_coverage(changes, snapshot, held)
            if pending:
                took = time.perf_counter() - started
                for listener in self.flush_listeners:
                    listener(took, acked)
            return acked

    def _append(self, key: StreamKey, rows: list[tuple]) -> tuple[int, OSError | None, bool]:
        """Store ``rows``: (ticks acknowledged, the storage error if some must be retried, refused for good)."""
        error = None
        try:
            batch = rows_to_batch(key.tick_type, rows)
            self.store.append(key.contract_id, key.tick_type, batch)
            stored = len(rows)
        except OSError as exc:  # StorageUnavailableError: disk full, I/O error; retry what was not stored
            error = exc
            stored = min(max(int(getattr(exc, "acknowledged", 0) or 0), 0), len(rows))
        except Exception as exc:  # out of order, sealed hour, malformed: these ticks can never be stored
            self._refuse(key, rows, exc)
            return 0, None, True
        if stored:
            self.acknowledged[key] = self.acknowledged.get(key, 0) + stored
            acked = batch if stored == len(rows) else batch.slice(0, stored)
            for listener in self.ack_listeners:
                listener(key, acked)
            if key in self._refusing and error is None:
                log.info("%s: the store accepts ticks again (%s refused ticks were dropped)",
                         key, _count(self._refusing.pop(key)))
        return stored, error, False

    def _refuse(self, key: StreamKey, rows: list[tuple], exc: Exception) -> None:
        self.dropped[key] = self.dropped.get(key, 0) + len(rows)
        if key not in self._refusing:
            self._refusing[key] = 0
            log.error("%s: the store refused %d ticks (%s); they are dropped and coverage marks a refused_by_store "
                      "gap; later refusals are counted, not logged", key, len(rows), exc,
                      exc_info=not isinstance(exc, (StorageError, ValueError)))
        self._refusing[key] += len(rows)

    def _refused_gap(self, key: StreamKey, rows: list[tuple], changes: list) -> list:
        """``changes`` with a refused_by_store gap over ``rows`` merged in by time."""
        gap = [_StateChange(key, rows[0][0], False, "refused_by_store")]
        if self._feed_recording.get(key):
            gap.append(_StateChange(key, rows[-1][0] + 1, True, "subscribed"))
        ours = [c for c in changes if isinstance(c, _StateChange) and c.key == key]
        merged = iter(sorted(ours + gap, key=lambda c: c.at_us))
        return [next(merged) if isinstance(c, _StateChange) and c.key == key else c for c in changes] + list(merged)

    def _storage_outcome(self, failure: OSError | None) -> None:
        """Track the store's health after a flush: one log line when it fails, changes reason or recovers."""
        now = time.monotonic()
        outage = self._outage
        if failure is None:
            if outage is not None:
                self._outage = None
                log.info("storage is back after %.1f s: stored %s held ticks; dropped %s",
                         now - outage.since, _count(sum(self.acknowledged.values()) - outage.acknowledged_before),
                         _count(sum(self.dropped.values()) - outage.dropped_before))
            return
        reason, short = _describe(failure)
        if outage is None:
            delay = self.flush_interval
            self._outage = _Outage(reason, short, now, delay, now + delay,
                                   sum(self.acknowledged.values()), sum(self.dropped.values()), now)
            detail = "" if str(failure).startswith(reason) else f" ({failure})"
            log.warning("storage unavailable: %s%s; holding received ticks and retrying with backoff", reason, detail)
            return
        if reason != outage.reason:
            log.warning("storage still unavailable, now: %s (was: %s)", reason, outage.reason)
            outage.reason, outage.short = reason, short
        outage.delay = min(outage.delay * 2, self.retry_max)
        outage.next_attempt = now + outage.delay

    def _record_coverage(self, changes: list, snapshot: int, held: set[StreamKey]) -> None:
        """Write coverage changes and contract details to the index, in order. Those of streams
        with ticks still held wait for them; those the index cannot take now are kept and retried."""
        index = self.store.index
        kept: list = []
        written = 0
        failure: Exception | None = None
        for change in changes:
            if failure is not None or (isinstance(change, _StateChange) and change.key in held):
                kept.append(change)
                continue
            try:
                if isinstance(change, ContractDetails):
                    index.upsert_contract(change)
                elif isinstance(change, _Roll):
                    self.store.record_roll(change.root, change.contract_id, change.active_from_us)
                else:
                    index.coverage_transition(change.key.contract_id, change.key.tick_type.value, change.at_us,
                                              "recorded" if change.recording else "gap", change.reason)
                    self.recording[change.key] = change.recording
                written += 1
            except (sqlite3.OperationalError, OSError) as exc:  # disk full, locked: retried next flush
                failure = exc
                kept.append(change)
            except Exception:
                log.exception("could not write %s to the index; it is skipped", change)
        if failure is None and (written or snapshot - self._last_confirm >= CONFIRM_EVERY_US):
            confirmed = [(k.contract_id, k.tick_type.value) for k, on in self.recording.items()
                         if on and k not in held and (k not in self._builders or self._builders[k].gap is None)]
            try:
                index.coverage_confirm(confirmed, snapshot)
                self._last_confirm = snapshot
                written += 1
            except Exception as exc:  # retried on the next flush
                failure = exc
        if kept:
            with self._lock:
                self._changes[:0] = kept
        if failure is not None or written:
            self._index_outcome(failure)

    def _index_outcome(self, failure: Exception | None) -> None:
        now = time.monotonic()
        if failure is None:
            if self._index_outage is not None:
                log.info("index is back after %.1f s: coverage and contract updates written",
                         now - self._index_outage[0])
                self._index_outage = None
        elif self._index_outage is None or self._index_outage[1] != str(failure):
            self._index_outage = (now, str(failure))
            log.warning("index unavailable: %s; coverage and contract updates are kept and retried (ticks are "
                        "unaffected)", failure)

    def _report(self) -> None:
        """While storage is unavailable or ticks are dropped: one summary line every ``summary_interval``."""
        now = time.monotonic()
        outage = self._outage
        if outage is not None:
            if now - outage.last_summary >= self.summary_interval:
                outage.last_summary = now
                log.warning("storage unavailable for %.0f s (%s): holding %s ticks, dropped %s; next attempt in "
                            "%.1f s", now - outage.since, outage.reason, _count(self.held()),
                            _count(sum(self.dropped.values()) - outage.dropped_before),
                            max(outage.next_attempt - now, 0))
            return
        with self._lock:
            dropping = [(key, b.gap.dropped) for key, b in self._builders.items() if b.gap is not None]
        if dropping and now - self._last_drop_summary >= self.summary_interval:
            self._last_drop_summary = now
            log.warning("dropping ticks, storage is slower than the feed: %s",
                        ", ".join(f"{key} {_count(n)} dropped" for key, n in dropping))

    def check_free_space(self) -> None:
        """Warn once when free space on the data root drops below ``disk_warn_free_bytes``; say when it recovers."""
        if not self.disk_warn_free_bytes:
            return
        root = self.store.settings.data_root
        try:
            free = shutil.disk_usage(root).free
        except OSError as exc:
            log.debug("could not check free space on %s: %s", root, exc)
            return
        low = free < self.disk_warn_free_bytes
        if low and not self._low_space:
            log.warning("free space on %s is low: %s left (warning below %s); recording stops being durable when "
                        "it runs out", root, byte_text(free), byte_text(self.disk_warn_free_bytes))
        elif self._low_space and not low:
            log.info("free space on %s is back above %s: %s free", root, byte_text(self.disk_warn_free_bytes), byte_text(free))
        self._low_space = low

    # -- the flusher thread --------------------------------------------------------------------

    def start(self) -> "Recorder":
        """Flush on a background thread: when ticks arrive, at most every ``flush_interval`` seconds."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recorder-flush", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the flusher after a last flush: everything received is acknowledged or reported.

        While storage is unavailable the last flush is retried for up to ``stop_flush_timeout``;
        then the ticks still held are reported (they were never acknowledged).
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._last_confirm = 0  # confirm coverage up to the last flush
        deadline = time.monotonic() + self.stop_timeout
        delay = self.flush_interval
        self.flush()
        while (self.held() or (self._changes and self._index_outage)) and time.monotonic() < deadline:
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, self.retry_max)
            self.flush()
        held = self.held()
        if held:
            streams = sum(1 for b in self._builders.values() if b.held())
            log.error("stopping with storage still unavailable (%s): %s held ticks of %d stream(s) could not be "
                      "stored within %.0f s; they were never acknowledged and are lost",
                      self._outage.reason if self._outage else "unknown", _count(held), streams, self.stop_timeout)
        try:
            self.store.index.coverage_close_recorded("recorder_stopped")
        except (sqlite3.OperationalError, OSError) as exc:
            log.error("could not close coverage in the index (%s); the next start closes it at the last confirmed "
                      "flush", exc)
        if self._changes and self._index_outage is not None:
            log.error("%d coverage/contract update(s) could not be written to the index before stopping (%s)",
                      len(self._changes), self._index_outage[1])

    def _run(self) -> None:
        """Group commit on demand: a flush starts as soon as ticks (or state changes) arrive, but no
        sooner than ``flush_interval`` after the previous one started, nor before the next retry while
        storage is unavailable; with nothing arriving it still runs every ``IDLE_FLUSH`` seconds
        (coverage confirmation, retries, free-space checks, summaries)."""
        next_disk_check = 0.0
        next_flush = 0.0
        while not self._stop.is_set():
            self._wake.wait(IDLE_FLUSH)
            outage = self._outage
            pause = (next_flush if outage is None else max(next_flush, outage.next_attempt)) - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                break
            if self._stop.is_set():
                break
            self._wake.clear()
            now = time.monotonic()
            if now >= next_disk_check:
                self.check_free_space()
                next_disk_check = now + DISK_CHECK_EVERY
            next_flush = now + self.flush_interval
            started = time.perf_counter()
            self.flush()
            took = time.perf_counter() - started
            if took > 10 * max(self.flush_interval, 0.02) and outage is None and self._outage is None:
                log.warning("flush took %.0f ms: storage is slow", took * 1e3)
            self._report()
