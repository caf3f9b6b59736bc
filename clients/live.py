"""Live plus historical: one stream's ticks as they are acknowledged, resumed across reconnects.

Every batch of a live stream carries its cursor (``app_metadata``: ``{"cursor": "<ts>:<n>",
"live": bool}``; see :mod:`storage.live`). :class:`LiveStream` keeps the last one and, when the
stream breaks (server restart, network, a reader dropped for falling behind), asks again from
that cursor: every tick arrives exactly once. The key that makes a tick unique, should a
consumer merge streams itself, is its position ``(ts, k)``: its ``ts`` and its rank among the
ticks with that ``ts``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import polars as pl
import pyarrow as pa
import pyarrow.flight as flight

from ibstream.clients.errors import translated
from ibstream.core.errors import IbstreamError, ServerUnavailableError
from ibstream.flight_server.commands import command

log = logging.getLogger(__name__)

Update = Callable[[pl.DataFrame], None]


class LiveStream:
    """Iterates DataFrames of one stream: history from ``start`` (or after ``cursor``), then each
    batch as the recorder acknowledges it, until ``end`` (``None``: until closed). One empty
    DataFrame marks the moment the history has been sent.

    ``cursor`` is the position after the last tick yielded; ``caught_up`` turns true once the
    history has been sent. If the server goes away the stream reconnects with backoff and
    resumes after ``cursor``, for up to ``reconnect_for`` seconds without success.
    """

    def __init__(self, flight_client: flight.FlightClient, contract_id: int, tick_type: str, *,
                 start: datetime | None = None, end: datetime | None = None, window: str | None = None,
                 cursor: str | None = None, resolution: str = "tick", reconnect_for: float = 60.0):
        self._flight = flight_client
        self.contract_id = contract_id
        self.tick_type = tick_type
        self.resolution = resolution
        self.cursor = cursor
        self.last_bar: datetime | None = None  # bars: the start of the last bar received
        self.caught_up = False
        self.reconnects = 0
        self._range = {"start": start, "end": end, "window": window}
        self._reconnect_for = reconnect_for
        self._reader: flight.FlightStreamReader | None = None
        self._closed = False

    def __iter__(self) -> Iterator[pl.DataFrame]:
        failing_since = None
        while not self._closed:
            try:
                for frame in self._read():
                    failing_since = None
                    yield frame
                return  # the stream reached its end
            except (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightCancelledError,
                    flight.FlightInternalError) as exc:
                if self._closed:
                    return
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self._reconnect_for:
                    raise ServerUnavailableError(f"live stream of {self.contract_id}/{self.tick_type} could not "
                                                 f"resume after cursor {self.cursor}: {exc}") from exc
                self.reconnects += 1
                log.info("live stream of %s/%s broke (%s); resuming after cursor %s", self.contract_id,
                         self.tick_type, str(exc).split(". Detail:")[0], self.cursor)
                time.sleep(min(2.0, 0.1 * self.reconnects))

    def _resume_point(self) -> dict:
        """Where a new call starts: the original range, after the cursor (ticks), or at the last
        bar received (bars: it is built again from its first tick and replaces the one held)."""
        if self.resolution != "tick":
            return self._range if self.last_bar is None else {"start": self.last_bar, "end": self._range["end"]}
        return self._range if self.cursor is None else {"cursor": self.cursor, "end": self._range["end"]}

    def _read(self) -> Iterator[pl.DataFrame]:
        descriptor = flight.FlightDescriptor.for_command(
            command(self.contract_id, self.tick_type, live=True, resolution=self.resolution, **self._resume_point()))
        try:
            info = self._flight.get_flight_info(descriptor)
            self._reader = self._flight.do_get(info.endpoints[0].ticket)
        except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:  # e.g. a read server refuses live streams
            raise translated(exc) from exc
        while not self._closed:
            try:
                chunk = self._reader.read_chunk()
            except StopIteration:
                return
            seam = False
            if chunk.app_metadata is not None:
                position = json.loads(chunk.app_metadata.to_pybytes())
                seam = position["live"] and not self.caught_up
                self.cursor, self.caught_up = position["cursor"], self.caught_up or position["live"]
            if chunk.data is not None and (chunk.data.num_rows or seam):  # the seam comes as an empty frame
                frame = pl.DataFrame(chunk.data)
                if frame.height and self.resolution != "tick":
                    self.last_bar = frame.get_column("ts")[-1]
                yield frame

    def close(self) -> None:
        """Stop: the iteration ends (the server is told to cancel the stream)."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()


class LiveFrame:
    """A polars DataFrame of one stream that keeps growing: history, then live ticks, exactly once
    per tick across the seam and across reconnects; for bars, one row per bar, the last one
    possibly still forming (``forming`` true). Built by :meth:`clients.Client.history_and_live`.

    ``frame`` is the DataFrame so far; ``on_update`` (if given) is called on the background
    thread with each new piece. ``wait_caught_up()`` waits for the history.
    """

    def __init__(self, stream: LiveStream, on_update: Update | None = None):
        self.stream = stream
        self.error: IbstreamError | None = None
        self._on_update = on_update
        self._pieces: list[pl.DataFrame] = []
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ibstream-live", daemon=True)
        self._thread.start()

    @property
    def frame(self) -> pl.DataFrame:
        with self._lock:
            if len(self._pieces) > 1:
                self._pieces = [pl.concat(self._pieces, rechunk=False)]
            return self._pieces[0] if self._pieces else pl.DataFrame()

    @property
    def height(self) -> int:
        with self._lock:
            return sum(piece.height for piece in self._pieces)

    @property
    def cursor(self) -> str | None:
        return self.stream.cursor

    def _drop_from(self, ts) -> None:
        """Drop the held rows at or after ``ts`` (they are the trailing ones: rows come in ts order)."""
        while self._pieces and self._pieces[-1].get_column("ts")[-1] >= ts:
            kept = self._pieces.pop().filter(pl.col("ts") < ts)
            if kept.height:
                self._pieces.append(kept)
                break

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        return self._caught_up.wait(timeout)

    def stop(self) -> None:
        self.stream.close()
        self._thread.join()

    def _run(self) -> None:
        try:
            for piece in self.stream:
                if piece.height:
                    with self._lock:
                        if self.stream.resolution != "tick":  # a bar row replaces the rows with its ts
                            self._drop_from(piece.get_column("ts")[0])
                        self._pieces.append(piece)
                    if self._on_update is not None:
                        self._on_update(piece)
                if self.stream.caught_up:
                    self._caught_up.set()
        except IbstreamError as exc:
            self.error = exc
            log.error("live frame of %s/%s stopped: %s", self.stream.contract_id, self.stream.tick_type, exc)
        finally:
            self._caught_up.set()
