"""The recorder: feed callbacks -> columnar builders -> group commit into the store.

Callbacks only append a row to an in-memory builder (no disk I/O on the feed's thread).
A flusher thread turns each builder into one Arrow record batch every ``flush_interval``
and appends it to the store: once ``Store.append`` returns, those ticks are acknowledged.
``ts`` is the local receive time in microseconds, held non-decreasing per stream (if the
clock steps back, ``ts`` stays at the last value until the clock catches up).
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
from storage.segments import StreamKey
from storage.store import Store
from storage.times import US_PER_SECOND, now_us

log = logging.getLogger(__name__)

AckListener = Callable[[StreamKey, pa.RecordBatch], None]


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

    def __init__(self, store: Store, *, flush_interval: float = 0.02, clock: Callable[[], int] = now_us):
        self.store = store
        self.flush_interval = flush_interval
        self.clock = clock
        self.acknowledged: dict[StreamKey, int] = {}
        self.dropped: dict[StreamKey, int] = {}
        self.ack_listeners: list[AckListener] = []
        self._builders: dict[StreamKey, _Builder] = {}
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
                pending = {key: b.rows for key, b in self._builders.items() if b.rows}
                for key in pending:
                    self._builders[key].rows = []
            acked = 0
            for key, rows in pending.items():
                batch = rows_to_batch(key.tick_type, rows)
                try:
                    self.store.append(key.contract_id, key.tick_type, batch)
                except Exception:
                    self.dropped[key] = self.dropped.get(key, 0) + len(rows)
                    log.exception("could not store %d ticks of %s; they are NOT acknowledged", len(rows), key)
                    continue
                self.acknowledged[key] = self.acknowledged.get(key, 0) + len(rows)
                acked += len(rows)
                for listener in self.ack_listeners:
                    listener(key, batch)
            return acked

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
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            started = time.perf_counter()
            self.flush()
            if time.perf_counter() - started > 10 * self.flush_interval:
                log.warning("flush took %.0f ms (interval %.0f ms): storage is slow",
                            (time.perf_counter() - started) * 1e3, self.flush_interval * 1e3)
