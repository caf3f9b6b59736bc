"""The recorder: feed callbacks -> columnar builders -> group commit into the store.

Callbacks only append a row to an in-memory builder (no disk I/O on the feed's thread).
A flusher thread turns each builder into one Arrow record batch every ``flush_interval``
and appends it to the store: once ``Store.append`` returns, those ticks are acknowledged.
``ts`` is the local receive time in microseconds, held non-decreasing per stream (if the
clock steps back, ``ts`` stays at the last value until the clock catches up).

Coverage: the feed reports when a stream starts and stops being recorded
(:meth:`Recorder.on_stream_state`); the flusher writes those transitions to the index after
the ticks received before them are acknowledged, and confirms the open 'recorded' interval
up to each flush (at most once a second), so after a crash coverage ends where the last
acknowledged flush did. If the store refuses an append, the ticks are kept and retried on
the next flush; only past ``max_retained`` ticks per stream are they dropped, and the span
becomes a 'storage_error' gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from recorder.feed import Size
from storage.schemas import TickType, schema_for
from storage.index import ContractDetails
from storage.segments import StreamKey
from storage.store import Store
from storage.times import US_PER_SECOND, now_us

log = logging.getLogger(__name__)

AckListener = Callable[[StreamKey, pa.RecordBatch], None]
CONFIRM_EVERY_US = US_PER_SECOND


@dataclass(frozen=True)
class _StateChange:
    key: StreamKey
    at_us: int
    recording: bool
    reason: str


@dataclass
class _Builder:
    rows: list[tuple] = field(default_factory=list)
    last_ts: int = -(2**63)


def rows_to_batch(tick_type: TickType, rows: list[tuple]) -> pa.RecordBatch:
    """One record batch of the tick type's schema from row tuples in schema column order."""
    schema = schema_for(tick_type)
    columns = list(zip(*rows))
    arrays = [pa.array(column, type=f.type) for column, f in zip(columns, schema)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class Recorder:
    """Records ticks from a feed into a writable :class:`~storage.store.Store`."""

    def __init__(self, store: Store, *, flush_interval: float = 0.02, clock: Callable[[], int] = now_us,
                 max_retained: int = 2_000_000):
        self.store = store
        self.flush_interval = flush_interval
        self.clock = clock
        self.max_retained = max_retained
        self.acknowledged: dict[StreamKey, int] = {}
        self.dropped: dict[StreamKey, int] = {}
        self.recording: dict[StreamKey, bool] = {}
        self.ack_listeners: list[AckListener] = []
        self._builders: dict[StreamKey, _Builder] = {}
        self._changes: list[_StateChange | ContractDetails] = []
        self._last_ok: dict[StreamKey, int] = {}
        self._last_confirm = 0
        closed = store.index.coverage_close_recorded("recorder_crashed")
        if closed:
            log.warning("%d stream(s) were being recorded when the last recorder stopped without closing them; "
                        "their coverage ends at the last confirmed flush", closed)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- TickSink ------------------------------------------------------------------------------

    def on_bid_ask(self, contract_id: int, ib_time: int, bid_price: float, ask_price: float,
                   bid_size: Size, ask_size: Size, bid_past_low: bool, ask_past_high: bool) -> None:
        self._add(StreamKey(contract_id, TickType.BID_ASK), ib_time,
                  (bid_price, ask_price, bid_size, ask_size, bid_past_low, ask_past_high))

    def on_trade(self, contract_id: int, tick_type: TickType, ib_time: int, price: float, size: Size,
                 exchange: str, special_conditions: str, past_limit: bool, unreported: bool) -> None:
        self._add(StreamKey(contract_id, TickType(tick_type)), ib_time,
                  (price, size, exchange, special_conditions, past_limit, unreported))

    def on_mid_point(self, contract_id: int, ib_time: int, mid_point: float) -> None:
        self._add(StreamKey(contract_id, TickType.MID_POINT), ib_time, (mid_point,))

    def on_stream_state(self, contract_id: int, tick_type: TickType | str, recording: bool, reason: str) -> None:
        """The feed started (``recording``) or stopped receiving a stream; ``reason`` says why."""
        change = _StateChange(StreamKey(contract_id, TickType(tick_type)), self.clock(), recording, reason)
        with self._lock:
            self._changes.append(change)

    def on_contract_details(self, details: ContractDetails) -> None:
        """Keep a contract's IB details (exchange, hours, time zone) in the index."""
        with self._lock:
            self._changes.append(details)

    def _add(self, key: StreamKey, ib_time: int, fields: tuple) -> None:
        received = self.clock()
        with self._lock:
            builder = self._builders.get(key)
            if builder is None:
                builder = self._builders[key] = _Builder()
            ts = max(received, builder.last_ts)
            builder.last_ts = ts
            builder.rows.append((ts, ib_time * US_PER_SECOND, *fields))

    # -- group commit --------------------------------------------------------------------------

    def flush(self) -> int:
        """Append everything received so far; returns the number of ticks acknowledged."""
        with self._flush_lock:
            with self._lock:
                snapshot = self.clock()
                pending = {key: b.rows for key, b in self._builders.items() if b.rows}
                for key in pending:
                    self._builders[key].rows = []
                changes, self._changes = self._changes, []
            acked = 0
            failed: set[StreamKey] = set()
            for key, rows in pending.items():
                if self._append(key, rows):
                    acked += len(rows)
                else:
                    failed.add(key)
                    self._retain(key, rows, snapshot)
            for key in self.recording.keys() - failed:
                self._last_ok[key] = snapshot
            self._record_coverage(changes, snapshot, failed)
            return acked

    def _append(self, key: StreamKey, rows: list[tuple]) -> bool:
        try:
            batch = rows_to_batch(key.tick_type, rows)
            self.store.append(key.contract_id, key.tick_type, batch)
        except Exception:
            log.exception("could not store %d ticks of %s; they are kept and retried on the next flush", len(rows), key)
            return False
        self.acknowledged[key] = self.acknowledged.get(key, 0) + len(rows)
        for listener in self.ack_listeners:
            listener(key, batch)
        return True

    def _retain(self, key: StreamKey, rows: list[tuple], snapshot: int) -> None:
        """Put unstored ticks back in front of newer ones, or drop them all past ``max_retained``."""
        with self._lock:
            builder = self._builders[key]
            if len(rows) + len(builder.rows) <= self.max_retained:
                builder.rows = rows + builder.rows
                return
        self.dropped[key] = self.dropped.get(key, 0) + len(rows)
        log.error("dropped %d ticks of %s after the store refused them for too long; coverage marks the gap",
                  len(rows), key)
        if self.recording.get(key):
            with self._lock:
                self._changes[:0] = [_StateChange(key, self._last_ok.get(key, snapshot), False, "storage_error"),
                                     _StateChange(key, snapshot, True, "subscribed")]

    def _record_coverage(self, changes: list, snapshot: int, failed: set[StreamKey]) -> None:
        index = self.store.index
        try:
            for change in changes:
                if isinstance(change, ContractDetails):
                    index.upsert_contract(change)
                    continue
                self.recording[change.key] = change.recording
                index.coverage_transition(change.key.contract_id, change.key.tick_type.value, change.at_us,
                                          "recorded" if change.recording else "gap", change.reason)
            if changes or snapshot - self._last_confirm >= CONFIRM_EVERY_US:
                confirmed = [(k.contract_id, k.tick_type.value) for k, on in self.recording.items()
                             if on and k not in failed]
                index.coverage_confirm(confirmed, snapshot)
                self._last_confirm = snapshot
        except Exception:
            log.exception("could not update coverage in the index; ticks are unaffected")

    def start(self) -> "Recorder":
        """Flush on a background thread every ``flush_interval`` seconds."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recorder-flush", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the flusher after a last flush: everything received is acknowledged or logged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._last_confirm = 0  # confirm coverage up to the last flush
        self.flush()
        self.store.index.coverage_close_recorded("recorder_stopped")

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            started = time.perf_counter()
            self.flush()
            if time.perf_counter() - started > 10 * self.flush_interval:
                log.warning("flush took %.0f ms (interval %.0f ms): storage is slow",
                            (time.perf_counter() - started) * 1e3, self.flush_interval * 1e3)
